"""Probe: KIVI's min/max scales against scales clipped to minimise each group's squared error.

    python experiments/kivi_clipped_scales.py "<spec>" prose 1   # clipped (0: KIVI's own min/max)

Perplexity on the bench's 4 windows x 256 tokens of the text after 4,096 compressed ones, 1 thread,
with ``kvcompress.methods.kivi.quantize`` replaced: for every group, the range shrunk about its middle by
0-25 % in 5 % steps, whichever leaves the least squared error over the group.
"""
import sys, torch
from kvcompress.methods import kivi as K
from kvcompress.bench.methods import resolve
from kvcompress.bench.perplexity import perplexity
from kvcompress.bench.texts import load_text, spread_offsets
from kvcompress.models import load_model
torch.set_num_threads(1)
spec, text = sys.argv[1], sys.argv[2]
def clipped(x, bits, dim, valid=None):
    levels = 2**bits - 1
    lo, hi = K.minmax(x, dim, valid)
    best = None  # [squared error, codes, scale, minimum] of the best clip so far
    for c in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75):
        pad = (1 - c) / 2 * (hi - lo)
        l, h = lo + pad, hi - pad
        scale = (h - l).clamp_min(1e-8) / levels
        codes = ((x - l) / scale).round().clamp(0, levels)
        err = (codes * scale + l - x) ** 2
        if valid is not None: err = err * valid
        err = err.sum(dim, keepdim=True)
        if best is None:
            best = [err, codes, scale, l]
        else:
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better, codes, best[1])
            best[2] = torch.where(better, scale, best[2]); best[3] = torch.where(better, l, best[3])
    return best[1].to(torch.uint8), best[2], best[3]
if sys.argv[3] == "1":
    K.quantize = clipped
model, tok = load_model()
ids = torch.tensor(tok.encode(load_text(text).body))
C, N = 4096, 256
offsets = spread_offsets(len(ids), C + N + 1, 4)
r = perplexity(resolve(spec), model, ids, C, N, offsets)
print(f"{spec} clipped={sys.argv[3]} {text}: ppl {r['perplexity']:.4f}", flush=True)
