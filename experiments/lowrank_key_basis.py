"""Which basis for ``lowrank`` keys: pre- or post-rotary, per head or joint, plain or query-aware PCA?

Calibrates on standard-library code that the harness never scores (``CALIBRATION_MODULES`` of
:mod:`kvcompress.calibration`) and scores English prose (``pydoc_data.topics``, the harness's default
text), the way ``kvcompress bench`` scores a method: the context (``--context`` tokens) is
compressed, the next ``--tokens`` tokens are scored against it in full precision (the residual
window). A single causal forward does that exactly: the cache projects the context's keys/values as
they arrive and leaves the continuation's alone. The first ``--sink`` tokens stay full precision
(attention sinks) in every variant.

- post-rotary: ``k -> mu + (k - mu) down up`` on the keys the cache receives;
- pre-rotary: undo the rotary rotation at the token's position, project, rotate back;
- joint: one basis over the concatenated KV heads of a layer (``H*D`` dims, rank ``H*r``);
- q-aware / o-aware: PCA in the metric that the error actually meets (keys: the second moment of
  the layer's queries, so ``E[(q . (k - k_hat))^2]`` is minimised; values: ``W_o`` of the heads
  reading the value).

Run: ``python experiments/lowrank_key_basis.py`` (~15 min on 2 busy CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvcompress
from kvcompress.generation import cache_kwarg


def rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def rotate(k, cos, sin):
    return k * cos + rotate_half(k) * sin


def unrotate(k, cos, sin):
    return k * cos - rotate_half(k) * sin


def weighted_pca(x, metric=None):
    """``x (G, T, E)``: mean ``(G, E)``, ``down (G, E, E)``, ``up (G, E, E)``, variances kept by rank."""
    x = x.double()
    mu = x.mean(1)
    c = x - mu[:, None]
    e = x.shape[-1]
    if metric is None:
        lower = torch.eye(e, dtype=x.dtype).expand(x.shape[0], e, e)
    else:
        metric = metric.double()
        metric = metric + 1e-6 * metric.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(e, dtype=x.dtype)
        lower = torch.linalg.cholesky(metric)
    y = c @ lower
    evals, u = torch.linalg.eigh(y.transpose(1, 2) @ y / y.shape[1])
    u, evals = u.flip(-1), evals.flip(-1)
    return mu.float(), (lower @ u).float(), (u.transpose(1, 2) @ torch.linalg.inv(lower)).float(), evals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--ratios", default="0.5,0.25")
    args = parser.parse_args()
    from kvcompress.calibration import calibration_text

    model, tok = kvcompress.load_model(device="cpu")
    import pydoc_data.topics as topics

    calib = tok(calibration_text(), return_tensors="pt")["input_ids"][:, : args.calib_tokens]
    prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    evaluation = tok(prose, return_tensors="pt")["input_ids"][:, 20000 : 20000 + args.context + args.tokens]
    cfg = model.config
    H, QH, D = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    T = max(calib.shape[1], evaluation.shape[1])
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(T)[None])
    cos, sin = cos[0], sin[0]

    queries = {}

    def keep_queries(module, _, kwargs, __):
        h = kwargs["hidden_states"]
        c, s = kwargs["position_embeddings"]
        q = module.q_proj(h).view(1, -1, QH, D).transpose(1, 2)  # (1, QH, T, D)
        queries[module.layer_idx] = rotate(q, c[:, None], s[:, None])[0]

    hooks = [layer.self_attn.register_forward_hook(keep_queries, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        model(calib, use_cache=True, **{cache_kwarg(model): cache})
    for h in hooks:
        h.remove()

    s = args.sink
    n = calib.shape[1]
    metric_q, metric_o, stats = [], [], []
    for i, layer in enumerate(cache.layers):
        q = queries[i][:, s:]  # (QH, T, D)
        metric_q.append((q.transpose(1, 2) @ q / q.shape[1]).view(H, QH // H, D, D).sum(1))
        w = model.model.layers[i].self_attn.o_proj.weight.view(-1, QH, D).permute(1, 2, 0)  # (QH, D, hidden)
        metric_o.append((w @ w.transpose(1, 2)).view(H, QH // H, D, D).sum(1).detach())
        k, v = layer.keys[0, :, s:], layer.values[0, :, s:]  # (H, T, D)
        stats.append((k, unrotate(k, cos[s:n], sin[s:n]), v))

    def joint(x):  # (H, T, D) -> (1, T, H*D)
        return x.transpose(0, 1).reshape(1, x.shape[1], -1)

    def bases(kind, heads, aware):
        out = []
        for i, (k_post, k_pre, v) in enumerate(stats):
            mk = metric_q[i] if aware and kind == "post" else None
            mv = metric_o[i] if aware else None
            k = k_post if kind == "post" else k_pre
            if heads == "joint":
                mk = None if mk is None else torch.block_diag(*mk)[None]
                mv = None if mv is None else torch.block_diag(*mv)[None]
                k, v = joint(k), joint(v)
            out.append((weighted_pca(k, mk), weighted_pca(v, mv)))
        return out

    def projector(b, r, heads):
        mu, down, up, _ = b

        def f(x):  # (1, H, n, D)
            if heads == "joint":
                y = x.transpose(1, 2).reshape(1, 1, x.shape[2], H * D)
                y = mu[:, None] + ((y - mu[:, None]) @ down[:, :, :r]) @ up[:, :r]
                return y.reshape(1, x.shape[2], H, D).transpose(1, 2)
            return mu[:, None] + ((x - mu[:, None]) @ down[:, :, :r]) @ up[:, :r]

        return f

    context = args.context

    class ProjectingCache(DynamicCache):
        def __init__(self, fns, kind):
            super().__init__(config=cfg)
            self.fns, self.kind = fns, kind

        def update(self, key_states, value_states, layer_idx, *a, **kw):
            fk, fv = self.fns[layer_idx]
            k, v = key_states.clone(), value_states.clone()
            part = slice(s, context)
            kc = k[:, :, part]
            if self.kind == "pre":
                c, si = cos[part], sin[part]
                k[:, :, part] = rotate(fk(unrotate(kc, c, si)), c, si)
            else:
                k[:, :, part] = fk(kc)
            v[:, :, part] = fv(v[:, :, part])
            return super().update(k, v, layer_idx, *a, **kw)

    def ppl(fns, kind):
        with torch.no_grad():
            logits = model(evaluation, use_cache=True, **{cache_kwarg(model): ProjectingCache(fns, kind)}).logits
        scored = slice(context, evaluation.shape[1] - 1)
        return math.exp(F.cross_entropy(logits[0, scored], evaluation[0, context + 1 :]).item())

    identity = lambda x: x  # noqa: E731
    base = ppl([(identity, identity)] * len(stats), "post")
    print(
        f"model smollm2-135m fp32 cpu; calibrated on {calib.shape[1]} code tokens, context {context} prose "
        f"tokens compressed (first {s} kept), next {args.tokens} scored; baseline ppl {base:.3f}"
    )
    print("ratio | variant | K only ppl (Δ%) | V only ppl (Δ%) | K+V ppl (Δ%)")
    variants = [
        ("post", "each", False),
        ("post", "each", True),
        ("pre", "each", False),
        ("post", "joint", False),
        ("post", "joint", True),
        ("pre", "joint", False),
    ]
    built = {v: bases(*v) for v in variants}
    for ratio in map(float, args.ratios.split(",")):
        for kind, heads, aware in variants:
            r = round(D * (1 - ratio)) * (H if heads == "joint" else 1)
            b = built[(kind, heads, aware)]
            fk = [projector(bk, r, heads) for bk, _ in b]
            fv = [projector(bv, r, heads) for _, bv in b]
            res = [
                ppl(list(zip(fk, [identity] * len(b))), kind),
                ppl(list(zip([identity] * len(b), fv)), kind),
                ppl(list(zip(fk, fv)), kind),
            ]
            name = f"{kind}-rotary {heads} {'aware' if aware else 'plain'}"
            cells = " | ".join(f"{p:.3f} ({100 * (p / base - 1):+.1f}%)" for p in res)
            print(f"{ratio:.2f} | {name:24s} | {cells}", flush=True)

    # Speed: attention-ready keys of one layer from latents, per decode step, at 4096 tokens.
    N, r = 4096, 32
    z, down = torch.randn(1, H, N, r), torch.randn(H, D, r)
    up = down.transpose(1, 2)
    c4, s4 = model.model.rotary_emb(torch.zeros(1), torch.arange(N)[None])
    q = torch.randn(1, H, QH // H, D)
    full = torch.randn(1, H, N, D)

    def bench(fn, reps=30):
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    t_post = bench(lambda: z @ up)
    t_pre = bench(lambda: rotate(z @ up, c4, s4))
    t_latent = bench(lambda: (q @ down) @ z.transpose(2, 3))
    t_full = bench(lambda: q @ full.transpose(2, 3))
    print(
        f"one layer's keys at {N} tokens (H={H}, D={D}, r={r}, fp32, {torch.get_num_threads()} threads), ms: "
        f"post-rotary reconstruct {t_post:.3f}; pre-rotary reconstruct + rotate {t_pre:.3f}; "
        f"scores in latent space (q down) Zᵀ {t_latent:.3f}; scores on uncompressed keys q Kᵀ {t_full:.3f}"
    )


if __name__ == "__main__":
    main()
