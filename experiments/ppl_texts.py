"""Does a perplexity text separate methods? The harness's perplexity of a few methods on several texts.

    PYTHONPATH=src python experiments/ppl_texts.py --texts prose,kjv --context 1024

Same protocol as ``kvcompress bench`` (``C`` compressed tokens, then ``N`` tokens scored one decode
step at a time, at ``W`` windows spread over the text); prints one row per (text, method) with the
perplexity and its change against ``none`` on the same windows. One thread.
"""

from __future__ import annotations

import argparse
import time

import torch

import kvcompress
from kvcompress.bench.methods import resolve
from kvcompress.bench.perplexity import perplexity
from kvcompress.bench.texts import load_text, spread_offsets

METHODS = "none,streaming:window=256,snapkv:ratio=0.75,h2o:ratio=0.75,kivi:bits=2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", default="prose,kjv")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = kvcompress.load_model()
    print(f"model {kvcompress.models.DEFAULT_MODEL}, float32, cpu, 1 thread; C={args.context}, "
          f"{args.tokens} tokens x {args.windows} windows")
    print(f"{'text':8} {'tokens':>9} {'method':24} {'ppl':>8} {'vs none':>8}")
    for name in args.texts.split(","):
        ids = torch.tensor(tokenizer(load_text(name).body, add_special_tokens=False)["input_ids"])  # (L,)
        offsets = spread_offsets(len(ids), args.context + args.tokens + 1, args.windows)
        base = None
        for spec in args.methods.split(","):
            start = time.perf_counter()
            ppl = perplexity(resolve(spec), model, ids, args.context, args.tokens, offsets)["perplexity"]
            base = base or ppl
            print(f"{name:8} {len(ids):>9} {spec:24} {ppl:8.3f} {100 * (ppl / base - 1):+7.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
