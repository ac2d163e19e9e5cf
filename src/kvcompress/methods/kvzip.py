"""KVzip: keep the tokens the model needs to reconstruct the context from its own cache.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", NeurIPS 2025,
https://arxiv.org/abs/2505.23416.

After the context is prefilled (and held uncompressed), it is fed again, in chunks of ``chunk``
tokens, each after a "repeat the previous context" prompt (in a chat template, the prompt ends the
user's turn and the chunk is the assistant's answer), as queries over the full-precision cache
(:func:`replay`, in this module). As in the paper's chunked scoring (Sec. 3.3 and Algorithm 1), a slot
of chunk ``k`` is scored by chunk ``k``'s replay step alone: its score is the largest attention weight
it receives from any token of the step (the prompt's and the chunk's) and any query head of its KV
head, in a softmax over the ``sink`` oldest tokens, chunk ``k``'s held slots and the step's own tokens
(the model's own attention in that step still reads the whole context; :func:`replay_step`, which a
layer calls for a replay step). One ranking over every head of
every layer (``allocation=global``, the paper's non-uniform budget) then keeps the best scores of
the whole model, per row: heads and layers keep different numbers of tokens, each head stored apart,
so what is evicted is freed. The replayed tokens are never kept, and the scores do not depend on any
question: one compressed context serves many.

``plus=true`` is KVzip+ (Jégou and Jeblick, "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning",
2026, https://arxiv.org/abs/2601.07891): each attention weight is weighed by the norm of what the
slot adds to the attention output over the norm of the replayed token's attention input.

``allocation=uniform`` keeps the same number of tokens in every head of every layer (the paper's
"uniform" variant); ``adaptive`` lets the heads of a layer share its budget; ``pyramid`` and
``retrieval`` as for every scored method (:mod:`kvcompress.methods.budgets`).

Departures from the paper:
- The newest ``window`` tokens (32) are kept whatever their score, as well as the first ``sink``
  (4, as in kvpress's port; the authors' code keeps the system prompt); both count toward the budget.
- The first ``sink`` tokens join every chunk's scoring softmax (as in kvpress's port; the authors'
  code does so with the system prompt; Algorithm 1 has no sinks).
- The prompt of a later chunk quotes the last 8 tokens of the chunk before as text (decoded, then
  encoded again after the instruction), not as the same token ids.
- Without a replay (a forward that does not go through :func:`kvcompress.generation.prefill`),
  slots are scored by the attention of the latest ``window`` queries, summed (SnapKV without pooling),
  and ``allocation=global`` keeps the average budget in every head. While decoding, every ``block``
  tokens each head is cut back to the budget it was given at the prompt, as every method here.
- Rows of a batch are ranked apart (each row keeps its own share of the model's budget).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from kvcompress import attention
from kvcompress.attach import KEYWORD
from kvcompress.generation import asked_part
from kvcompress.methods.scored import ScoredEviction
from kvcompress.models import cache_kwarg
from kvcompress.protocols import LayerView
from kvcompress.step import DenseSegment, Operands, Replayed, StepInputs
from kvcompress.registry import register


@register("kvzip")
@dataclass(frozen=True)
class KVzip(ScoredEviction):
    """``kvzip:ratio=0.75,chunk=2048``; see :class:`ScoredEviction` for shared fields (here ``sink`` is 4
    and ``allocation`` is ``global``: one budget for every head of every layer).

    Args:
        chunk: tokens of the context replayed per forward (the paper's 2K). A slot's score is normalized
            over its chunk's slots (and the sinks and the replay step), so the chunk size changes the
            scores, not only the time.
        plus: KVzip+ normalization: each attention weight ``a_ij`` of replayed token ``j`` on slot ``i``
            is weighed by ``|W_O v_i| / |h_j|`` (what the slot adds to the output, over the norm of the
            token's attention input ``h_j``) before the maximum.
    """

    sink: int = 4
    chunk: int = 2048
    plus: bool = False
    allocation: str = "global"

    def __post_init__(self):
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {self.chunk}")

    @property
    def attention_window(self) -> int:
        return max(1, self.window)  # without a replay, and while decoding

    @property
    def replay_norms(self) -> bool:
        return self.plus

    @property
    def replay(self) -> int:
        return self.chunk if self.evicts else 0

    def replay_prompt(self, first: bool) -> str:
        return (
            "Repeat the previous context exactly."
            if first
            else "Repeat the part of the previous context exactly, starting with"
        )

    def replay_context(self, model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> None:
        replay(model, tokenizer, input_ids, attention_mask, cache)

    def replay_step(self, layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inputs: StepInputs,
                    scaling: float) -> torch.Tensor:
        return replay_step(layer, query, keys, values, inputs, scaling)

    def score(self, view: LayerView) -> torch.Tensor:
        return view.attention  # (B, H, S)


@torch.no_grad()
def replay(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> None:
    """Score the context the cache holds uncompressed by replaying it, then compress it (KVzip).
    Call it inside :func:`kvcompress.attach`, after prefilling the context under ``cache.deferred()``
    (:func:`kvcompress.generation.prefill` does both, through :meth:`KVzip.replay_context`).

    Each row's real tokens are cut into chunks of ``selection.replay`` tokens; chunk ``k`` is fed
    after the selection's prompt (with a chat template, as the user's turn followed by the assistant
    header) and, after the first, the last tokens of chunk ``k - 1`` (where to resume), at the
    positions that follow the context, as queries only (:meth:`kvcompress.cache.CompressedCache.replay`), and
    told which of the row's tokens it replays (:class:`kvcompress.step.Replayed`), so that the layers score
    those slots alone. Rows are chunked on their own tokens and left-padded,
    so a row is scored as it is alone. On exit the selection's allocation shares the budget over the model.

    Args:
        input_ids, attention_mask: ``(B, T)`` the context the cache was prefilled with (left-padded).
    """
    selection = cache.pipeline.selection
    size = selection.replay
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    lengths = attention_mask.sum(-1, keepdim=True)  # (B, 1)
    first = tokenizer.encode(asked_part(tokenizer, selection.replay_prompt(True)), add_special_tokens=False)
    chunks = max(-(-len(row) // size) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = {cache_kwarg(model): cache}
    with cache.replay(), _replay_norms(model) if selection.replay_norms else contextlib.nullcontext():
        for k in range(chunks):
            start = torch.tensor([min(k * size, len(row)) for row in rows])  # (B,) the chunk: tokens start .. stop - 1
            stop = torch.tensor([min((k + 1) * size, len(row)) for row in rows])
            fed = []  # each row's prompt and chunk; nothing for a row with fewer chunks
            for row in rows:
                part = row[k * size : (k + 1) * size]
                prompt = first if k == 0 else _resume(tokenizer, selection, row[max(0, k * size - RESUME) : k * size])
                fed.append(prompt + part if part else [])
            width = max(len(f) for f in fed)
            ids = torch.tensor([[pad] * (width - len(f)) + f for f in fed], device=input_ids.device)  # (B, n)
            mask = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in fed], device=input_ids.device)
            positions = lengths + (mask.cumsum(-1) - 1).clamp_min(0)  # after each row's context
            with cache.replay_chunk(Replayed(start, stop, selection.sink)):
                model(
                    input_ids=ids, attention_mask=torch.cat([attention_mask, mask], 1), position_ids=positions,
                    use_cache=True, logits_to_keep=1, **kwargs,
                )


def replay_step(layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inputs: StepInputs, scaling: float) -> torch.Tensor:
    """A layer's replay step (:class:`kvcompress.cache.CompressedLayer`): the ``q`` new tokens attend to every
    held slot and causally to each other, as in a normal step, but are not stored. The score of a slot of
    the replayed chunk (:class:`~kvcompress.step.Replayed`) becomes the most attention it received from
    any of them (the prompt's and the chunk's) and any query head of its KV head, in a softmax over the
    sinks, the chunk's held slots and the step's tokens only (Algorithm 1), or its score from an earlier
    replay step if higher. Returns the ``(B, Hq, q, D)`` attention output."""
    batch, heads, new, _ = keys.shape
    held = len(layer)
    valid = layer.valid()
    if valid is None:
        valid = torch.ones(batch, heads, held, dtype=torch.bool, device=keys.device)
    mine = torch.ones(batch, heads, new, dtype=torch.bool, device=keys.device)
    if inputs.valid is not None:
        mine = mine & inputs.valid[:, None, :]
    segments = (*layer.segments(), DenseSegment(keys, values))
    output = attention.attend(query, Operands(segments, torch.cat([valid, mine], -1), heads), scaling).output
    chunk = inputs.replay
    age = valid.cumsum(-1) - 1  # (B, H, S) 0 = the row's oldest real token
    start, stop = chunk.start.to(age)[:, None, None], chunk.stop.to(age)[:, None, None]
    read = valid & ((age < chunk.sink) | ((age >= start) & (age < stop)))  # (B, H, S) the scoring softmax's held slots
    held_keys, held_values = layer.dense_keys_values()
    scale = None
    if inputs.output_weight is not None:  # KVzip+: |W_O v| per query head and slot, over |h| per query
        every = torch.cat([held_values, values], 2).float()  # (B, H, S + q, D)
        rep = query.shape[1] // heads
        out_heads = inputs.output_weight.float().view(-1, heads, rep, every.shape[-1])  # (hidden, H, g, D)
        contributed = torch.einsum("bhsd,ehgd->bhgse", every, out_heads).norm(dim=-1)  # (B, H, g, S + q)
        scale = (contributed.flatten(1, 2), 1 / inputs.hidden_norm.float().clamp_min(1e-6))
    peak = attention.peak_attention(query, torch.cat([held_keys, keys], 2), torch.cat([read, mine], -1), scaling, scale)
    peak = peak[..., :held] * (read & (age >= start))  # (B, H, S) the chunk's slots only: the sinks' are not its
    scoring = layer.scoring
    scoring.set_attention(peak if scoring.attention is None else torch.maximum(scoring.attention, peak))
    scoring.held = None  # the replay's queries stand in for the held context's own
    return output


@contextlib.contextmanager
def _replay_norms(model):
    """KVzip+: give every attention module's replay step the norm of its input at each token and its
    output projection (forward pre-hooks on the attention modules, removed on exit)."""

    def hook(module, args, kwargs):
        inputs = kwargs.get(KEYWORD)
        if inputs is None or inputs.replay is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, q, hidden)
        norms = dataclasses.replace(inputs, hidden_norm=hidden.norm(dim=-1), output_weight=module.o_proj.weight)
        return args, {**kwargs, KEYWORD: norms}

    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and isinstance(getattr(m, "o_proj", None), torch.nn.Linear)]
    if not modules:
        raise ValueError(f"KVzip+ normalization needs attention modules with an `o_proj` output projection; {type(model).__name__} has none")
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


RESUME = 8  # tokens of the chunk before that a replay chunk's prompt quotes, to say where to resume


def _resume(tokenizer, selection, tail: list[int]) -> list[int]:
    """The prompt of a later replay chunk: the instruction, then the end of the chunk before."""
    text = selection.replay_prompt(False) + " " + tokenizer.decode(tail)
    return tokenizer.encode(asked_part(tokenizer, text), add_special_tokens=False)
