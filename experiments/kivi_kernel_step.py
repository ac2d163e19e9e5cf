"""One decode step of KIVI attention alone: the kernel's time per layer call, on a store of 4,064 tokens.

    python experiments/kivi_kernel_step.py TREE [TREE ...]

Each TREE is a checkout of kvcompress (its ``src`` is imported in a process of its own, so two commits are
compared on the same machine in the same run: ``git worktree add /tmp/old <commit>``). One thread; 1 row,
3 KV heads of 3 query heads each, head dim 64, group 32, a 32-slot window, no observation; best of 5 rounds
of 200 calls after 20 warm-up calls. The store is hot in the caches here, as it is not in a model's decode
step (the weights stream it out): compare decode steps with ``kvcompress bench --parts speed``.
"""

import subprocess
import sys

CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1] + "/src")
torch.set_num_threads(1)
from kvcompress.methods.kivi import KIVI
from kvcompress.step import DenseSegment
torch.manual_seed(0)
B, H, G, D, N, W = 1, 3, 3, 64, 4064, 32
out = []
for bits in (4, 2):
    store = KIVI(bits=bits, group=32).new_store(0, D, torch.float32)
    store.append(torch.randn(B, H, N, D), torch.randn(B, H, N, D), None, None)
    segment = store.segment()
    window = DenseSegment(torch.randn(B, H, W, D), torch.randn(B, H, W, D))
    query, observed = torch.randn(B, H, G, D), torch.empty(0)
    for _ in range(20):
        segment.attend_one(query, window, None, 0.125, observed)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            segment.attend_one(query, window, None, 0.125, observed)
        rounds.append((time.perf_counter() - start) / 200 * 1e6)
    out.append(f"{bits}-bit {min(rounds):.1f} us")
print(sys.argv[1], ", ".join(out))
"""

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for tree in sys.argv[1:]:
        subprocess.run([sys.executable, "-c", CHILD, tree], check=True)
