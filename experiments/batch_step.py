"""What continuous batching's per-request attention costs: a decode step of ``B`` sequences held as one cache
of ``B`` rows (one attention call per layer) against the same ``B`` sequences as ``B`` caches side by side in
a :class:`kvcompress.batching.CacheBatch` (each cache's attention called in turn, a Python loop per layer).

    python experiments/batch_step.py --methods "none;kivi:bits=4" --batches 1,4,16 --context 4096

Every sequence holds the same ``--context`` tokens of the ``prose`` text (the one-cache batch repeats its rows,
each with its own pages); both arrangements take turns of 4 steps for ``--rounds`` rounds, on one thread,
and the median step is compared. Greedy tokens of both are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvcompress
from kvcompress.batching import CacheBatch
from kvcompress.bench.feed import step
from kvcompress.bench.texts import load_text
from kvcompress.models import cache_kwarg, load_model


def _one_cache(model, ids: torch.Tensor, spec: str, batch: int):
    cache = kvcompress.make_cache(spec, model)
    with torch.no_grad(), kvcompress.attach(model, cache):
        logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1:]
    cache.batch_repeat_interleave(batch)
    cache.unshare()  # distinct sequences hold and read their own pages
    return cache, logits.argmax(-1).repeat_interleave(batch, 0)


def _side_by_side(model, ids: torch.Tensor, spec: str, batch: int):
    caches = []
    for _ in range(batch):
        cache = kvcompress.make_cache(spec, model)
        with torch.no_grad(), kvcompress.attach(model, cache):
            logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1:]
        cache.context = (ids, torch.ones_like(ids))
        caches.append(cache)
    return CacheBatch(caches), logits.argmax(-1).repeat_interleave(batch, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none;kivi:bits=4")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    ids = torch.tensor([tokenizer.encode(load_text("prose").body)[: args.context]])
    print(f"# python experiments/batch_step.py --methods {args.methods!r} --batches {args.batches} --context {args.context} "
          f"--rounds {args.rounds}; 1 thread")
    print("| method | batch | one cache, ms/step | caches side by side, ms/step | side by side / one cache | same tokens |")
    print("|---|---|---|---|---|---|")
    for spec in args.methods.split(";"):
        for batch in (int(b) for b in args.batches.split(",")):
            runs = [dict(zip(("cache", "token"), make(model, ids, spec, batch)), s=[], tokens=[])
                    for make in (_one_cache, _side_by_side)]
            position = args.context
            with torch.no_grad():
                for _ in range(args.rounds):
                    for run in runs:
                        at = position
                        with kvcompress.attach(model, run["cache"]):
                            for _ in range(4):
                                start = time.perf_counter()
                                run["token"] = step(model, run["cache"], run["token"], at)[:, -1:].argmax(-1)
                                run["s"].append(time.perf_counter() - start)
                                run["tokens"].append(run["token"])
                                at += 1
                    position = at
            one, side = (1000 * statistics.median(run["s"]) for run in runs)
            same = all(torch.equal(a, b) for a, b in zip(runs[0]["tokens"], runs[1]["tokens"]))
            print(f"| {spec} | {batch} | {one:.1f} | {side:.1f} | {side / one:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
