"""kvcompress.attach: what it installs is scoped, the model is left as it was, and misuse is refused."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import StoppingCriteria

import kvcompress
from kvcompress.generation import ContextTooLongError, answer
from kvcompress.models import cache_kwarg

# A spec per registered method that compresses a 200-token context; scored methods default to ratio=0.5.
COMPRESSING = {
    "streaming": "streaming:window=32",
    "kivi": "kivi:bits=2,residual=16",
    "lowrank": "lowrank:ratio=0.5,residual=16",
    "share_heads": "share_heads:groups=2,residual=16",
    "share_layers": "share_layers:threshold=-1,residual=16",
}


def _installed(model):
    return model.config._attn_implementation, dict(model._forward_pre_hooks), dict(model._forward_hooks)


def _plain_outputs(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return logits, generated


@pytest.mark.model
def test_every_method_leaves_the_model_and_tokenizer_as_they_were(smol):
    model, tokenizer = smol
    ids = tokenizer("The lighthouse keeper wrote down every ship that passed.", return_tensors="pt")["input_ids"]
    before, installed, padding_side = _plain_outputs(model, ids), _installed(model), tokenizer.padding_side
    tokenizer.padding_side = "right"  # generate() pads batches on the left without changing this
    context = "The old harbour town kept its records in a stone tower by the sea. " * 14
    for name in kvcompress.methods():
        spec = COMPRESSING.get(name, f"{name}:ratio=0.5")
        cache = kvcompress.make_cache(spec, model)
        kvcompress.generate(model, tokenizer, [context, "A short one."], "Where were the records?", method=spec, max_new_tokens=4)
        with kvcompress.attach(model, cache), torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, **{cache_kwarg(model): cache})
        assert cache.get_seq_length() > 0
    assert tokenizer.padding_side == "right"
    tokenizer.padding_side = padding_side
    assert _installed(model) == installed
    after = _plain_outputs(model, ids)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


class _Explode(StoppingCriteria):
    def __init__(self, after):
        self.after, self.calls = after, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt  # what a user's Ctrl-C mid-generation looks like
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_an_exception_mid_generation_still_restores_the_model(tiny):
    installed = _installed(tiny)
    cache = kvcompress.make_cache("snapkv:ratio=0.5", tiny)
    ids = torch.randint(3, 128, (1, 40))
    with pytest.raises(KeyboardInterrupt), kvcompress.attach(tiny, cache), torch.no_grad():
        assert tiny.config._attn_implementation == "kvcompress" and len(tiny._forward_pre_hooks) == len(installed[1]) + 1
        tiny.generate(ids, max_new_tokens=10, do_sample=False, stopping_criteria=[_Explode(3)], **{cache_kwarg(tiny): cache})
    assert _installed(tiny) == installed
    assert cache.attached_to is None


def test_two_threads_generate_on_one_model_each_as_alone(tiny):
    """Each thread's attach overlaps the other's: neither restores the model under the other."""
    installed = _installed(tiny)
    prompts = {name: torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(i)) for i, name in enumerate("ab")}

    def run(name: str) -> torch.Tensor:
        cache = kvcompress.make_cache("expected_attention:ratio=0.5,window=8+kivi:bits=4,residual=8", tiny)  # shares rotary tables
        with kvcompress.attach(tiny, cache), torch.no_grad():
            ids = prompts[name]
            mask = torch.ones_like(ids)
            return tiny.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **{cache_kwarg(tiny): cache})

    alone = {name: run(name) for name in prompts}
    start, results, failures = threading.Barrier(2), {name: [] for name in prompts}, []

    def worker(name: str) -> None:
        try:
            start.wait(timeout=60)
            for _ in range(6):
                results[name].append(run(name))
        except Exception as err:  # reported by the main thread
            failures.append(err)

    threads = [threading.Thread(target=worker, args=(name,)) for name in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    for name, outputs in results.items():
        assert len(outputs) == 6 and all(torch.equal(out, alone[name]) for out in outputs)
    assert _installed(tiny) == installed


def test_a_cache_outside_attach_says_how_to_use_it(tiny):
    cache = kvcompress.make_cache("kivi:bits=4", tiny)
    with pytest.raises(RuntimeError, match=r"with kvcompress.attach\(model, cache\)"):
        tiny(torch.tensor([[3, 4, 5]]), use_cache=True, **{cache_kwarg(tiny): cache})


def test_a_cache_for_another_model_is_refused(tiny):
    other = type(tiny)(tiny.config).eval()  # same shapes, other weights
    cache = kvcompress.make_cache("kivi:bits=4", tiny)
    with pytest.raises(ValueError, match=r"made for another model .*weights"):
        with kvcompress.attach(other, cache):
            pass
    config = tiny.config.to_dict() | {"num_hidden_layers": 3}
    deeper = type(tiny)(type(tiny.config)(**config)).eval()
    with pytest.raises(ValueError, match="layers 2 != 3"):
        kvcompress.attach(deeper, cache).__enter__()


def test_a_cache_attached_to_one_model_is_refused_by_another(tiny):
    cache = kvcompress.make_cache("kivi:bits=4", tiny)
    with kvcompress.attach(tiny, cache):
        with pytest.raises(RuntimeError, match="already attached"):
            kvcompress.attach(copy.deepcopy(tiny), cache).__enter__()  # the same weights, another model object


@pytest.mark.model
def test_answer_refuses_misuse_with_the_fix(smol):
    model, tokenizer = smol
    cache = kvcompress.make_cache("none", model)
    answer(model, tokenizer, "Ada was born in 1815.", "When was Ada born?", cache, 4)
    with pytest.raises(ValueError, match=r"already holds .* cache.reset\(\)"):
        answer(model, tokenizer, "Another document.", "What is it?", cache, 4)
    cache.reset()
    assert cache.get_seq_length() == 0
    answer(model, tokenizer, "Another document.", "What is it?", cache, 4)  # works again once emptied
    with pytest.raises(ValueError, match="drop question_aware"):
        kvcompress.generate(model, tokenizer, "Ada was born in 1815.", "When?", method="streaming:window=8", question_aware=True)
    with pytest.raises(ContextTooLongError, match="lower max_new_tokens to"):
        kvcompress.generate(model, tokenizer, "Ada was born in 1815.", "When?", method="none", max_new_tokens=8192)
