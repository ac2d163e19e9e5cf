"""What a small tensor operation costs inside a decode step, against the same operation in a loop.

A decode step streams the model's weights (540 MB for the default model) through the caches, so the
code and data of the few small operations a cache layer runs per step (a mean over heads, a mask
copy, a ctypes call into a kernel) are cold each time: they cost several times what a micro-benchmark
of the same operation says. This is what remains of the eviction methods' overhead over `none` at
equal tokens (experiments/README.md, "Fewer operations per decode step"; experiments/cold-ops-2026-12-02.txt).

    python experiments/cold_ops.py            # 1 thread; prints microseconds per operation

Each operation is timed 200 times alone (warm, in a loop), and 200 times right after a forward of
one token through the default model (weights streamed, no cache), medians in microseconds; last, the
four in a row (after a forward, the first pays most of the misses the others would).
"""

from __future__ import annotations

import statistics
import time

import torch

from kvcompress.models import load_model


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    token = torch.tensor([[tokenizer.encode("The")[0]]])
    scores = torch.rand(1, 3, 1152)[..., :1089]  # a layer's observed attention over ~1,089 slots, a view
    mask = torch.rand(1, 3, 1152)[..., :1089] > 0.01
    budget = torch.full((1, 3, 1), 1024)
    operations = {
        "mean over heads (1, 3, 1089)": lambda: scores.mean(1, keepdim=True),
        "bool mask to uint8 copy": lambda: mask.to(torch.uint8).contiguous(),
        "budget // 2, clamp": lambda: (budget // 2).clamp_max(32),
        "mask clone": lambda: mask.clone(),
    }
    ops = list(operations.values())
    operations["the four above in a row"] = lambda: [op() for op in ops]
    with torch.no_grad():
        model(token)  # warm up
        print(f"{'operation':32s} {'alone (us)':>11s} {'after a forward (us)':>21s}")
        for name, op in operations.items():
            alone, after = [], []
            for _ in range(200):
                start = time.perf_counter()
                op()
                alone.append(time.perf_counter() - start)
            for _ in range(200):
                model(token)
                start = time.perf_counter()
                op()
                after.append(time.perf_counter() - start)
            print(f"{name:32s} {1e6 * statistics.median(alone):11.1f} {1e6 * statistics.median(after):21.1f}")


if __name__ == "__main__":
    main()
