"""Why does `none` in pages decode slower than `none` in one contiguous buffer? The kernels, alone.

    python experiments/paged_layout.py

Times one decode step's attention of a 30-layer, 4,096-token cache of the default model's shape (3 KV
heads, 3 query heads each, head dim 64, float32), one thread, the layers taken in turn as a decode step
takes them, so every layer's keys and values come from memory, not from the CPU's caches:

- `dense`: `kvcompress::dense_attend` over each layer's contiguous `(1, H, S, D)` keys and values;
- `pages in contiguous memory`: `kvcompress::paged_attend` over 32-slot pages that are slices of those
  same contiguous tensors (the page tables point into them): the paged kernel, dense memory;
- `pages, P=...`: `kvcompress::paged_attend` over a `PagedBuffer` per layer, pages of P slots filled
  32 tokens at a time in every layer in turn (as decoding fills them): each page its own allocation.

Prints milliseconds per layer call, the median of `--rounds` rounds of 20 steps.
"""

import argparse
import statistics
import time

import torch

from kvcompress import kernels
from kvcompress.kernels import NO_MASK, NO_OBSERVATION
from kvcompress.paged import PagedBuffer
from kvcompress.pages import PagePool

HEADS, GROUP, DIM, LAYERS = 3, 3, 64, 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    slots = args.context
    query = torch.randn(1, HEADS, GROUP, DIM)
    layers = [(torch.randn(1, HEADS, slots, DIM), torch.randn(1, HEADS, slots, DIM)) for _ in range(LAYERS)]

    def dense():
        for keys, values in layers:
            kernels.dense_attend(query, [], [], 0, keys, values, NO_MASK, 0.125, NO_OBSERVATION)

    pages = slots // 32
    npages, fills = torch.full((HEADS,), pages, dtype=torch.int64), torch.full((HEADS,), 32, dtype=torch.int64)
    inside = []
    for keys, values in layers:  # (H, J) addresses of 32-slot slices of the contiguous tensors
        at = lambda t: torch.tensor([[t.data_ptr() + 4 * (h * slots + j * 32) * DIM for j in range(pages)]  # noqa: E731
                                     for h in range(HEADS)], dtype=torch.int64)
        inside.append((at(keys), at(values)))

    def contiguous_pages():
        for key_pages, value_pages in inside:
            kernels.paged_attend(query, key_pages, value_pages, npages, fills, 32, NO_MASK, 0.125, NO_OBSERVATION)

    runs = [("dense", dense), ("pages in contiguous memory, P=32", contiguous_pages)]
    for page in (32, 64, 128, 256):
        buffers = [PagedBuffer(PagePool(page=page)) for _ in range(LAYERS)]
        for start in range(0, slots, 32):
            for buffer, (keys, values) in zip(buffers, layers):
                buffer.append(keys[:, :, start : start + 32], values[:, :, start : start + 32], None)
        segments = [(b.segment(), b.segment().page_counts()) for b in buffers]

        def paged(segments=segments, page=page):
            for segment, counts in segments:
                kernels.paged_attend(query, *segment.pointers(), *counts, page, NO_MASK, 0.125, NO_OBSERVATION)

        runs.append((f"pages, P={page}, each its own allocation", paged))
    times = {name: [] for name, _ in runs}
    for _ in range(args.rounds):
        for name, run in runs:
            run()
            start = time.perf_counter()
            for _ in range(20):
                run()
            times[name].append((time.perf_counter() - start) / 20 / LAYERS * 1e3)
    base = statistics.median(times["dense"])
    for name, _ in runs:
        ms = statistics.median(times[name])
        print(f"{name:42s} {ms:6.3f} ms per layer call  {ms / base:5.2f}x dense")


if __name__ == "__main__":
    main()
