"""Perplexity and KV bytes/token of low-rank and sharing specs, with the harness's own protocol.

Uses ``kvcompress.bench``'s perplexity (prefill ``C`` tokens compressed, then score ``N`` tokens
one decode step at a time) on its default text (prose), so numbers match ``kvcompress bench``'s
perplexity column; the calibration is the default one (standard-library code the harness never
scores). Bytes per token are the cache's per-token bytes after the window (``nbytes / seen``);
fixed bytes (bases) are printed apart.

Run: ``python experiments/lowrank_frontier.py --context 1024 --specs "none,lowrank:ratio=0.5"``.
"""

from __future__ import annotations

import argparse
import time

import torch

import kvcompress
from kvcompress.bench.methods import resolve
from kvcompress.bench.perplexity import perplexity
from kvcompress.bench.texts import load_text, spread_offsets


def split_specs(raw: str) -> list[str]:
    """Split on commas that start a new method (a spec's own parameters are comma-separated too)."""
    from kvcompress.registry import methods

    names = set(methods()) | {"none"}
    specs = []
    for piece in raw.split(","):
        head = piece.split(":")[0].split("+")[0].strip()
        if specs and head not in names:
            specs[-1] += "," + piece
        else:
            specs.append(piece.strip())
    return specs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", required=True)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--text", default="prose")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = kvcompress.load_model(device="cpu")
    ids = tokenizer(load_text(args.text).body, return_tensors="pt")["input_ids"][0]
    offsets = spread_offsets(len(ids), args.context + args.tokens + 1, args.windows)
    fp = kvcompress.models.model_summary(model)["kv_bytes_per_token"]
    base = None
    print(f"smollm2-135m fp32 cpu, text {args.text}, C={args.context}, {args.windows}x{args.tokens} scored tokens")
    print("spec | ppl | Δ vs none | KV B/token (x smaller) | fixed bytes | s")
    for spec in split_specs(args.specs):
        t = time.time()
        method = resolve(spec)
        ppl = perplexity(method, model, ids, args.context, args.tokens, offsets)["perplexity"]
        cache = method.new_cache(model)
        with torch.no_grad():
            from kvcompress.bench.methods import fill_context

            fill_context(method, model, ids[None, : args.context], cache)
        per_token = cache.nbytes / args.context
        base = ppl if spec == "none" else base
        delta = f"{100 * (ppl / base - 1):+.2f}%" if base else "-"
        print(f"{spec} | {ppl:.3f} | {delta} | {per_token:.0f} ({fp / per_token:.2f}x) | {cache.fixed_nbytes} | {time.time() - t:.0f}", flush=True)


if __name__ == "__main__":
    main()
