"""Batched decode steps of `none` and one method, alternating in one process: where a batch's time goes.

    python experiments/throughput_steps.py "snapkv:ratio=0.55,allocation=retrieval,window=256+kivi:bits=4,group=16" 33

`none` decodes at batch 4 and the method at the given batch (the bench's throughput part picks it from
the KV memory budget), both over the first 4,096 tokens of the `prose` text repeated; they take turns
of 4 steps, 8 rounds, 1 thread, and every step's time is printed, so the steps that settle the window
into the store or evict show apart from the others. Tokens/s counts every step, the first included
(the bench warms up first; this script does not).
"""

import argparse
import time

import torch

from kvcompress.bench.feed import step
from kvcompress.bench.methods import resolve
from kvcompress.bench.speed import _fill_batch
from kvcompress.bench.texts import load_text
from kvcompress.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("batch", type=int)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    ids = torch.tensor([tokenizer.encode(load_text("prose").body)[: args.context]])
    runs = []
    with torch.no_grad():
        for spec, batch in (("none", 4), (args.spec, args.batch)):
            method = resolve(spec)
            cache, logits = _fill_batch(method, model, ids, batch, None, tokenizer)
            runs.append({"spec": spec, "batch": batch, "method": method, "cache": cache,
                         "token": logits[:, -1:].argmax(-1), "position": args.context, "s": []})
        for _ in range(args.rounds):
            for run in runs:
                with run["method"].session(model, run["cache"]):
                    for _ in range(4):
                        start = time.perf_counter()
                        run["token"] = step(model, run["cache"], run["token"], run["position"])[:, -1:].argmax(-1)
                        run["s"].append(time.perf_counter() - start)
                        run["position"] += 1
    base = None
    for run in runs:
        tokens_per_s = run["batch"] * len(run["s"]) / sum(run["s"])
        base = base or tokens_per_s
        print(f"{run['spec']} batch {run['batch']}: {1000 * sum(run['s']) / len(run['s']):.1f} ms/step, "
              f"{tokens_per_s:.2f} tokens/s ({tokens_per_s / base:.2f}x none)")
        print("  ms per step:", " ".join(f"{1000 * s:.0f}" for s in run["s"]))


if __name__ == "__main__":
    main()
