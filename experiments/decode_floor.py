"""How fast can a compressed cache decode here? `none` over fewer tokens is the floor of eviction.

    python experiments/decode_floor.py

A cache that keeps k of C tokens can at best decode as fast as `none` holding k tokens: the weights
are the same, only the attention reads fewer bytes. This script times single-sequence greedy decode
steps (1 thread, `prose`) of `none` at C = 4,096 and at fewer tokens, and of some methods at 4,096,
all in one process, taking turns of 4 steps for 8 rounds after a warm-up round, and prints each one's
median step against `none` at 4,096. Issue #10's targets for 4x eviction (<= 0.76x for
`streaming:window=1024`) can be read against `none` at 1,024 tokens.
"""

import argparse
import statistics
import time

import torch

from kvcompress.bench.feed import step
from kvcompress.bench.methods import resolve
from kvcompress.bench.speed import _fill_batch
from kvcompress.bench.texts import load_text
from kvcompress.models import load_model

ROWS = (("none", 4096), ("none", 1024), ("none", 256), ("none", 16),
        ("streaming:window=1024", 4096), ("snapkv:ratio=0.75", 4096),
        ("snapkv:ratio=0.75+kivi:bits=4", 4096), ("h2o:ratio=0.75", 4096), ("tova:ratio=0.75", 4096),
        ("adakv:ratio=0.75", 4096), ("kivi:bits=4", 4096))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    ids = torch.tensor([tokenizer.encode(load_text("prose").body)[:4096]])
    runs = []
    with torch.no_grad():
        for spec, context in ROWS:
            method = resolve(spec)
            cache, logits = _fill_batch(method, model, ids[:, :context], 1, None, tokenizer)
            runs.append({"name": f"{spec} @ {context}", "method": method, "cache": cache,
                         "token": logits[:, -1:].argmax(-1), "position": context, "s": []})
        for round_ in range(args.rounds + 1):
            for run in runs:
                with run["method"].session(model, run["cache"]):
                    for _ in range(4):
                        start = time.perf_counter()
                        run["token"] = step(model, run["cache"], run["token"], run["position"])[:, -1:].argmax(-1)
                        if round_:  # the first round warms up
                            run["s"].append(time.perf_counter() - start)
                        run["position"] += 1
    base = statistics.median(runs[0]["s"])
    for run in runs:
        median = statistics.median(run["s"])
        print(f"{run['name']:<40} {1000 * median:6.1f} ms/token  {median / base:.2f}x none @ 4096")


if __name__ == "__main__":
    main()
