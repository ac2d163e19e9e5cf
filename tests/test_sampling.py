"""The sampler: plain torch draws (temperature, top-k, top-p) from a seeded generator, forced on a greedy generate."""

from __future__ import annotations

import pytest
import torch

from kvcompress.sampling import Sampler, Sampling, sample


def _logits(rows: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3  # (B, V)


def test_top_k_1_and_a_tiny_top_p_draw_the_argmax():
    logits = _logits()
    for _ in range(5):
        assert torch.equal(sample(logits, 1.5, top_k=1), logits.argmax(-1))
        assert torch.equal(sample(logits, 1.5, top_p=1e-6), logits.argmax(-1))
        assert torch.equal(sample(logits, 1.0, top_p=0.0), logits.argmax(-1))


def test_draws_stay_in_the_top_k_and_in_the_nucleus():
    logits = _logits(rows=1, vocab=10)
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    nucleus = order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist()  # smallest set reaching 0.6
    generator = torch.Generator().manual_seed(1)
    top3, in_nucleus = set(order[:3].tolist()), set()
    for _ in range(200):
        assert sample(logits, 1.0, top_k=3, generator=generator).item() in top3
        in_nucleus.add(sample(logits, 1.0, top_p=0.6, generator=generator).item())
    assert in_nucleus <= set(nucleus) and len(in_nucleus) == len(nucleus)  # all of it, nothing beyond


def test_a_seeded_generator_reproduces_its_draws_and_another_seed_differs():
    logits = _logits(rows=8, vocab=1000) / 10  # flat enough that draws vary
    draw = lambda seed: sample(logits, 1.0, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_the_sampler_forces_its_choice_keeps_greedy_rows_and_reports_logprobs():
    logits = _logits(rows=3)
    sampler = Sampler([(Sampling(), 1), (Sampling(temperature=1.0, seed=3, logprobs=2), 2)])
    forced = sampler(torch.zeros(3, 1, dtype=torch.long), logits)
    tokens = forced.argmax(-1)
    assert (forced == 0).sum() == 3 and torch.isinf(forced).sum() == 3 * 49  # one possible token per row
    assert tokens[0] == logits[0].argmax()  # the greedy row
    again = Sampler([(Sampling(), 1), (Sampling(temperature=1.0, seed=3, logprobs=2), 2)])
    assert torch.equal(again(torch.zeros(3, 1, dtype=torch.long), logits).argmax(-1), tokens)  # the same seed
    assert sampler.chosen[0] is None
    pick = sampler.chosen[1]
    logprobs = logits[1].log_softmax(-1)
    assert pick.token == tokens[1] and pick.logprob == pytest.approx(logprobs[pick.token].item())
    assert [t for t, _ in pick.top] == logprobs.topk(2).indices.tolist()
    with pytest.raises(ValueError, match="2 rows' settings for a batch of 3"):
        Sampler([(Sampling(), 2)])(torch.zeros(3, 1, dtype=torch.long), logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"logprobs": 21}, "logprobs")],
)
def test_bad_settings_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_a_sampled_answer_follows_its_seed_and_temperature_0_is_greedy(tiny):
    from kvcompress import ask, compress

    class Ids:  # a tokenizer of the tiny random model: text is space-separated ids
        chat_template = None
        pad_token_id = 0

        def __call__(self, texts, add_special_tokens=True, **_):
            rows = [[int(w) for w in t.split()] for t in texts]
            width = max(map(len, rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            return _Batch(input_ids=ids, attention_mask=mask)

        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(map(str, r.tolist())) for r in rows]

    tokenizer = Ids()
    cache = compress(tiny, tokenizer, "5 6 7 8 9 10 11 12", "none", templated=True)
    run = lambda sampling: ask(tiny, tokenizer, cache, [" 13 14"], 12, sampler=Sampler([(sampling, 1)]), templated=True)[0]  # noqa: E731
    greedy = ask(tiny, tokenizer, cache, [" 13 14"], 12, templated=True)[0]
    assert run(Sampling(temperature=0)) == greedy
    assert run(Sampling(temperature=1.5, seed=4)) == run(Sampling(temperature=1.5, seed=4))
    assert len({run(Sampling(temperature=1.5, seed=s)) for s in range(4)}) > 1


class _Batch(dict):
    def to(self, device):
        return self
