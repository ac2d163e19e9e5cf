"""Would a query-aware key basis keep attention closer than the key-variance (PCA) basis?

Keys of every third layer of SmolLM2 from a 3,072-token prose forward, rebuilt from rank 48 of 192
(joint heads, pre-rotary, the default calibration's mean and covariance) with two bases: the plain
PCA one ``lowrank`` uses, and PCA in the metric ``diag(w)``, ``w`` the queries' mean energy per
rotary channel pair (invariant under rotation, so valid for pre-rotary keys). Compared: the KL
divergence of the last 256 queries' attention from exact attention, and how often its argmax
stays. Caveat: ``w`` is measured on the first half of the same text (a real calibration would
measure it on the calibration text). Llama-specific (reads ``q_proj``). Run:
``python experiments/lowrank_query_metric.py`` (~2 min).
"""
import torch, kvcompress
from transformers import DynamicCache
from kvcompress.generation import cache_kwarg
from kvcompress.calibration import Rotary, Calibration, default_path
from kvcompress.methods.lowrank import principal
torch.set_num_threads(2)
m, tok = kvcompress.load_model(device="cpu")
from kvcompress.bench.texts import load_text
ids = tok(load_text("prose").body, return_tensors="pt")["input_ids"][:, 30000:30000 + 3072]
cal = Calibration.load(default_path(m), m)
QH, H, D = 9, 3, 64
qs = {}
def rot_half(x):
    a, b = x.chunk(2, -1); return torch.cat((-b, a), -1)
def hook(mod, args, kwargs, out):
    h = kwargs["hidden_states"]; c, s = kwargs["position_embeddings"]
    q = mod.q_proj(h).view(1, -1, QH, D).transpose(1, 2)
    qs[mod.layer_idx] = (q * c[:, None] + rot_half(q) * s[:, None])[0].detach()
hs = [l.self_attn.register_forward_hook(hook, with_kwargs=True) for l in m.model.layers]
cache = DynamicCache(config=m.config)
with torch.no_grad():
    m(ids, use_cache=True, **{cache_kwarg(m): cache})
for h in hs: h.remove()
rot = Rotary(m)
T = ids.shape[1]; pos = torch.arange(T)
half = T // 2
res = {"var": [], "qaware": []}
for layer in range(0, 30, 3):
    k = cache.layers[layer].keys[0]  # (H,T,D) post
    q = qs[layer]  # (QH,T,D) post
    kpre = rot.unrotate(k, pos)
    # query pair energy per kv head from first half
    e = q[:, 4:half] ** 2
    e = (e + e.roll(D // 2, -1)) / 2  # pair energy, both channels
    w = e.mean(1).view(H, QH // H, D).sum(1)  # (H, D)
    mean, basis, var = principal(cal.keys_mean[layer], cal.keys_cov[layer], 1)
    r = 48
    # variance basis
    U = basis[0, :, :r]
    def rec_var(x):  # x (H,T,D) pre
        j = x.transpose(0, 1).reshape(T, -1)
        z = (j - mean[0]) @ U
        return (mean[0] + z @ U.T).reshape(T, H, D).transpose(0, 1)
    # q-aware: diag metric on joint E, PCA of calibration cov in metric
    sw = w.reshape(-1).sqrt()  # (E,)
    C = cal.keys_cov[layer].double() * sw[:, None] * sw[None, :]
    ev, V = torch.linalg.eigh(C); V = V.flip(-1)[:, :r].float()
    down = sw[:, None] * V; up = V.T / sw[None, :]
    def rec_q(x):
        j = x.transpose(0, 1).reshape(T, -1)
        z = (j - mean[0]) @ down
        return (mean[0] + z @ up).reshape(T, H, D).transpose(0, 1)
    for name, f in (("var", rec_var), ("qaware", rec_q)):
        kr = rot.rotate(f(kpre), pos)
        kr[:, :4] = k[:, :4]
        qq = q[:, -256:]  # last 256 queries
        kk, kkr = k.repeat_interleave(3, 0), kr.repeat_interleave(3, 0)
        mask = torch.ones(256, T, dtype=torch.bool).tril(T - 256)
        s1 = (qq @ kk.transpose(1, 2) / 8).masked_fill(~mask, -1e9)
        s2 = (qq @ kkr.transpose(1, 2) / 8).masked_fill(~mask, -1e9)
        p1, lp2 = s1.softmax(-1), s2.log_softmax(-1)
        kl = (p1 * (p1.clamp_min(1e-30).log() - lp2)).sum(-1).mean().item()
        top = (s1.argmax(-1) == s2.argmax(-1)).float().mean().item()
        res[name].append((kl, top))
    print(layer, "var KL %.4f top1 %.3f | qaware KL %.4f top1 %.3f" % (*res["var"][-1], *res["qaware"][-1]), flush=True)
for n in res:
    print(n, "mean KL", sum(a for a, _ in res[n]) / len(res[n]), "top1", sum(b for _, b in res[n]) / len(res[n]))
