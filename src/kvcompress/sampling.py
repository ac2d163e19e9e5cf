"""Choosing the next token: greedy, or drawn with temperature, top-k and top-p from a seeded generator.

:class:`Sampler` is a transformers ``LogitsProcessor`` handed to a greedy ``model.generate``: it picks
every row's next token itself and leaves only that token possible, so ``generate``'s argmax takes it.
All the choosing is here, in plain torch (:func:`sample`), so one batch can mix greedy rows and rows
sampled with different settings, and a row's draws come from its own request's ``torch.Generator``
rather than torch's global one: an answer depends on its seed, not on the requests batched beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

MAX_TOP_LOGPROBS = 20  # as OpenAI's API
_SEEDS = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens.

    Args:
        temperature: 0 is greedy (the most likely token; ``top_k`` and ``top_p`` then change nothing);
            above 0, tokens are drawn from ``softmax(logits / temperature)``.
        top_k: draw among the ``top_k`` most likely tokens only (0: all).
        top_p: draw among the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling, Holtzman et al. 2020, https://arxiv.org/abs/1904.09751); the most likely
            token is always kept, so ``top_p`` near 0 is greedy.
        seed: the generator's seed: the same seed gives the same draws. None: a random seed.
        logprobs: None, or report each chosen token's log-probability with this many most likely
            alternatives (0 to 20), under the model's own distribution (before temperature, top-k, top-p).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2] (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (1: no limit), got {self.top_p}")
        if self.seed is not None and not _SEEDS[0] <= self.seed <= _SEEDS[1]:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs (the alternatives listed) must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from ``(B, V)`` logits: softmax at ``temperature`` (> 0), restricted to the
    ``top_k`` most likely tokens (0: all) and to the nucleus of mass ``top_p``; returns ``(B,)`` ids."""
    scores = logits.float() / temperature  # (B, V)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ranked, order = scores.sort(dim=-1, descending=True)  # (B, V) each
        probs = ranked.softmax(-1)
        above = probs.cumsum(-1) - probs  # (B, V): the mass of the tokens ranked above each one
        drop = above >= top_p
        drop[:, 0] = False  # the most likely token always stays
        scores = scores.scatter(-1, order, ranked.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


@dataclass(frozen=True)
class Choice:
    """A chosen token with its log-probability and the ``top`` most likely tokens' (``(id, logprob)``, best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class Sampler(LogitsProcessor):
    """Picks each row's next token by its request's :class:`Sampling` and forces ``generate`` to take it.

    ``groups``: ``(sampling, rows)`` in row order: a request's ``rows`` consecutive rows (its choices)
    share one generator, seeded on first use on the logits' device. After each step, :attr:`chosen`
    holds each row's :class:`Choice` (None for a row whose request asked for no logprobs).
    """

    def __init__(self, groups: list[tuple[Sampling, int]]):
        self.groups = groups
        self.generators: list[torch.Generator | None] = [None] * len(groups)
        self.chosen: list[Choice | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = sum(n for _, n in self.groups)
        if scores.shape[0] != rows:
            raise ValueError(f"the sampler was given {rows} rows' settings for a batch of {scores.shape[0]}")
        tokens = torch.empty(rows, dtype=torch.long, device=scores.device)  # (B,)
        start = 0
        for g, (sampling, n) in enumerate(self.groups):
            part = scores[start : start + n]  # (n, V)
            if sampling.greedy:
                tokens[start : start + n] = part.argmax(-1)  # as generate's greedy step picks (first of ties)
            else:
                generator = self._generator(g, scores.device)
                tokens[start : start + n] = sample(part, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            start += n
        self.chosen = self._choices(scores, tokens)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)  # (B, V): only the choice

    def _generator(self, g: int, device: torch.device) -> torch.Generator:
        if self.generators[g] is None:
            generator, seed = torch.Generator(device=device), self.groups[g][0].seed
            if seed is None:
                generator.seed()  # a random seed
            else:
                generator.manual_seed(seed)
            self.generators[g] = generator
        return self.generators[g]

    def _choices(self, scores: torch.Tensor, tokens: torch.Tensor) -> list[Choice | None]:
        wanted = [s.logprobs for s, n in self.groups for _ in range(n)]
        if all(w is None for w in wanted):
            return [None] * len(wanted)
        logprobs = scores.float().log_softmax(-1)  # (B, V)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        best = torch.topk(logprobs, max(w or 0 for w in wanted), dim=-1)  # (B, k) values and ids
        values, ids = best.values.tolist(), best.indices.tolist()
        return [
            None if w is None else Choice(token, logprob, list(zip(ids[i][:w], values[i][:w])))
            for i, (w, token, logprob) in enumerate(zip(wanted, tokens.tolist(), chosen))
        ]
