"""Resident memory a prefill adds, with and without handing freed pages back to the system.

    python experiments/prefill_peak.py "snapkv:ratio=0.75" [--no-trim]

One process per call: loads the default model, prefills the first 4,096 tokens of `prose` with the
method (after the bench's warm-up) and prints `prefill_added_bytes` of `kvcompress.bench.speed.measure`
(peak RSS read right after the prefill, less RSS just before it) and the KV bytes held. `--no-trim`
turns `kvcompress.native.trim_heap` off, to see what the C heap keeps of the pages a prompt cut frees.
"""

import argparse

import torch

from kvcompress import native
from kvcompress.bench import speed
from kvcompress.bench.methods import resolve
from kvcompress.bench.texts import load_text
from kvcompress.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--no-trim", action="store_true")
    args = parser.parse_args()
    if args.no_trim:
        native.trim_heap = lambda: None
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    ids = torch.tensor([tokenizer.encode(load_text("prose").body)[: args.context]])
    found = speed.measure(resolve(args.spec), model, ids, 2)
    print(f"{args.spec:24s} {'no trim' if args.no_trim else 'trim   '}  prefill added {found['prefill_added_bytes'] / 2**20:6.0f} MiB"
          f"  KV held {found['kv_bytes_after_prefill'] / 2**20:5.1f} MiB")


if __name__ == "__main__":
    main()
