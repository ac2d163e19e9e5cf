"""Decode step times of one commit's code, for comparing commits in turns on the same machine.

    python experiments/decode_step_trees.py TREE "SPEC;SPEC;..."

TREE is a checkout of kvcompress (``git worktree add /tmp/old <commit>``), whose ``src`` is imported. One
thread; the default model; 4,096 tokens of the prose text prefilled, then 48 greedy decode steps, each
timed alone; prints each spec's median and fastest step. Run it for each tree in turns, several rounds.
"""
import sys, time, torch
sys.path.insert(0, sys.argv[1] + "/src")
torch.set_num_threads(1)
import kvcompress
model, tok = kvcompress.load_model(device="cpu")
from kvcompress.bench.texts import load_text
ids = tok(load_text("prose").body, return_tensors="pt")["input_ids"][:, :4096]
for spec in sys.argv[2].split(";"):
    cache = kvcompress.make_cache(spec, model)
    with torch.no_grad(), kvcompress.attach(model, cache):
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(48):
            t = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            nxt = out.logits[:, -1:].argmax(-1)
    times.sort()
    print(sys.argv[1], spec, f"median {times[len(times)//2]*1e3:.1f} ms  min {times[0]*1e3:.1f}", flush=True)
