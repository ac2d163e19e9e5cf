"""Quality probe: KIVI with different key and value widths (a store patched in; plain-PyTorch path).

    PYTHONPATH=src python experiments/kivi_key_value_bits.py KEY_BITS VALUE_BITS CONTEXT TOKENS WINDOWS [SPEC]

Perplexity of TOKENS tokens scored one decode step at a time after CONTEXT compressed ones, at WINDOWS
windows spread over prose and kjv. Padding is ignored (batch 1). Asks whether 4-bit keys with 2-bit
values keep perplexity within 5 % at about 8x, the throughput target of issue 10.
"""
import sys, math, torch
import kvcompress
from kvcompress.methods import kivi as K
from kvcompress.step import DenseSegment
from kvcompress.bench.texts import load_text, spread_offsets
torch.set_num_threads(1)
KB, VB = int(sys.argv[1]), int(sys.argv[2])
C, N, W = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
class Store(K.KIVIStore):
    """Its tensors held whole (``held``), not in pages: keys and values here have different widths."""
    held: dict = {}
    def __len__(self):
        return self.held["key_codes"].shape[3] if self.held else 0
    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.held.values())
    def append(self, keys, values, valid, positions=None):
        tmp = K.KIVIStore(KB, self.block, self.dtype, self.meta_dtype)
        tmp.append(keys, keys, valid)  # keys at KB (its values are discarded)
        g = self.block
        codes, scale, mn = K.quantize(values.unflatten(3, (values.shape[3] // g, g)), VB, dim=4)
        new = dict(tmp.tensors, value_codes=K.pack(codes.flatten(3, 4), VB), value_scale=scale.squeeze(4).to(self.meta_dtype), value_min=mn.squeeze(4).to(self.meta_dtype))
        self.held = {k: torch.cat([self.held[k], t], self.TOKEN_DIM.get(k, 2)) if self.held else t for k, t in new.items()}
    def keys_values(self):
        t, g = self.held, self.block
        kc = K.unpack(t["key_codes"].transpose(2, 3), KB).unflatten(2, (-1, g))
        keys = kc.float() * t["key_scale"][:, :, :, None].float() + t["key_min"][:, :, :, None].float()
        vc = K.unpack(t["value_codes"], VB).unflatten(3, (-1, g))
        values = vc.float() * t["value_scale"][..., None].float() + t["value_min"][..., None].float()
        return keys.flatten(2, 3), values.flatten(3, 4)
    def segment(self):
        return DenseSegment(*self.keys_values())
K.KIVI.new_store = lambda self, i, d, dt: Store(self.bits, self.group, dt, torch.float16)
model, tok = kvcompress.load_model(device="cpu")
spec = sys.argv[6] if len(sys.argv) > 6 else "kivi:bits=4"
for text in ("prose", "kjv"):
    ids = tok(load_text(text).body, return_tensors="pt")["input_ids"][0]
    tot = []
    for off in spread_offsets(len(ids), C + N + 1, W):
        w = ids[off: off + C + N + 1][None]
        cache = kvcompress.make_cache(spec, model)
        with torch.no_grad(), kvcompress.attach(model, cache):
            out = model(w[:, :C], past_key_values=cache, use_cache=True)
            lg = out.logits[0, -1]
            for p in range(C, C + N):
                tot.append(float(torch.nn.functional.cross_entropy(lg.float(), w[0, p])))
                lg = model(w[:, p:p+1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p])).logits[0, -1]
    print(f"K{KB}V{VB} {spec} C={C} {text}: ppl {math.exp(sum(tot)/len(tot)):.3f}  bytes {cache.nbytes}", flush=True)
