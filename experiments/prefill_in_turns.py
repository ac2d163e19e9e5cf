"""Prefill time of each method against ``none``, taken in turns in one process, several times each.

    PYTHONPATH=src python experiments/prefill_in_turns.py --context 4096 --repeats 3 \
        --methods "none;kivi:bits=4;snapkv:ratio=0.75;h2o:ratio=0.75"

The bench times one prefill per row, each in its own process, so its prefill column moves by about
±0.1x between runs. Here every method prefills the same ``--context`` tokens of ``prose`` through
``model(ids, past_key_values=cache)`` (one thread), the methods in turn, ``--repeats`` rounds, and the
table gives each method's fastest and median prefill and their ratios to ``none``'s. Methods are
separated by ``;`` (a spec may hold commas).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.bench.texts import load_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", required=True, help="specs separated by ';' (the first should be none)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    specs = [s.strip() for s in args.methods.split(";") if s.strip()]
    if "none" not in specs:
        parser.error("--methods must include none: ratios are to it")
    torch.set_num_threads(1)
    model, tokenizer = kvcompress.load_model(device="cpu")
    ids = tokenizer(load_text("prose").body, return_tensors="pt")["input_ids"][:, : args.context]
    if ids.shape[1] < args.context:
        parser.error(f"the text has only {ids.shape[1]} tokens")

    def prefill(spec: str) -> float:
        cache = DynamicCache() if spec == "none" else kvcompress.make_cache(spec, model)
        with torch.no_grad(), kvcompress.attach(model, cache) if spec != "none" else torch.no_grad():
            start = time.perf_counter()
            model(ids, past_key_values=cache, use_cache=True)
            return time.perf_counter() - start

    for spec in specs:  # warm-up: kernels built, calibrations loaded, allocator primed
        with torch.no_grad():
            cache = DynamicCache() if spec == "none" else kvcompress.make_cache(spec, model)
            with kvcompress.attach(model, cache) if spec != "none" else torch.no_grad():
                model(ids[:, :256], past_key_values=cache, use_cache=True)
    times = {spec: [] for spec in specs}
    for _ in range(args.repeats):
        for spec in specs:
            times[spec].append(prefill(spec))
    best, middle = min(times["none"]), statistics.median(times["none"])
    width = max(len(s) for s in specs)
    print(f"prefill of {args.context} tokens of prose, 1 thread, {args.repeats} rounds in turns; torch {torch.__version__}")
    print(f"{'method':{width}} | fastest s (x none) | median s (x none)")
    for spec in specs:
        fast, med = min(times[spec]), statistics.median(times[spec])
        print(f"{spec:{width}} | {fast:7.2f} ({fast / best:.2f}x)   | {med:7.2f} ({med / middle:.2f}x)")


if __name__ == "__main__":
    main()
