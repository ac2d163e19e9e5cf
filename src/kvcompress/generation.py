"""Compress a context once, then ask a question that is not compressed, and decode an answer."""

from __future__ import annotations

import contextlib

import torch

from kvcompress.attach import attach
from kvcompress.cache import CompressedCache, make_cache
from kvcompress.models import cache_kwarg


class ContextTooLongError(ValueError):
    """The prompt (with the answer's tokens) does not fit in the model's position range."""


def split_prompt(tokenizer, context: str, question: str | None) -> tuple[str, str]:
    """Split the model's prompt into the part to compress (the context) and the part asked after it.

    With a chat template, the context sits inside the user turn and everything after it (question,
    end of turn, assistant header) is the uncompressed part. Without one, the question follows the
    context after a blank line.
    """
    asked = f"\n\n{question}" if question else ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + asked}], add_generation_prompt=True, tokenize=False
        )
        end = text.index(context) + len(context)
        return text[:end], text[end:]
    return context, asked


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: CompressedCache,
    logits_to_keep: int = 0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Run ``input_ids`` through the model into ``cache`` (compressing it); return the logits.

    Call it inside :func:`kvcompress.attach`. Positions come from the padding mask, so a
    left-padded row gets the positions it has alone.
    ``logits_to_keep=n`` computes only the last ``n`` positions' logits (0: all), which spares a
    ``(B, T, vocab)`` tensor when only the next token matters.
    ``chunk=n`` feeds the context ``n`` tokens at a time, compressing after each, so memory peaks
    at about the compressed context plus one chunk instead of the whole context in full precision;
    later chunks then attend to the compressed earlier ones (what decoding does), so results differ
    slightly from one forward. Only the last chunk's logits are returned.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {cache_kwarg(model): cache}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    length = input_ids.shape[1]
    if not chunk or length <= chunk:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs).logits
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    with cache.prefilling(attention_mask.sum(-1)):
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            out = model(
                input_ids=input_ids[:, start:stop],
                attention_mask=attention_mask[:, :stop],
                position_ids=position_ids[:, start:stop],
                use_cache=True,
                **kwargs,
            )
    return out.logits


def generate(
    model,
    tokenizer,
    context: str | list[str],
    question: str | None = None,
    method: str = "none",
    max_new_tokens: int = 64,
    question_aware: bool = False,
    prefill_chunk: int | None = None,
) -> str | list[str]:
    """Compress ``context`` with ``method``, then ask ``question`` (not compressed) and answer greedily.

    Args:
        model: a transformers causal LM (left as it was: see :func:`kvcompress.attach`).
        tokenizer: its tokenizer (batches are padded on the left; the tokenizer is not changed).
        context: one context, or a list of contexts answered as a batch.
        question: asked after each context; None to continue the context.
        method: compression spec, e.g. ``"streaming:window=1024+kivi:bits=4"``.
        max_new_tokens: answer length limit.
        question_aware: compress the context only once the question has been read, so methods
            that score tokens by attention (SnapKV, H2O, ...) see the question (SnapKV's original
            setting, for one-shot document Q&A). The default compresses the context on its own,
            so the compressed context could serve any question. Refused for methods that do not
            score by attention (it would change nothing but when they compress).
        prefill_chunk: feed the context this many tokens at a time, compressing between chunks, so
            memory peaks at about the compressed context plus one chunk (see :func:`prefill`;
            512 is a good size); None feeds it in one forward.

    Returns:
        The answer, or a list of answers for a list of contexts.

    Raises:
        ContextTooLongError: the prompt and ``max_new_tokens`` exceed the model's maximum position.
        SpecError: bad method spec.
        ValueError: ``question_aware`` with a method that does not score by attention.
    """
    answers = answer(model, tokenizer, context, question, make_cache(method, model), max_new_tokens, question_aware, prefill_chunk)
    return answers[0] if isinstance(context, str) else answers


def answer(
    model,
    tokenizer,
    context: str | list[str],
    question: str | None,
    cache: CompressedCache,
    max_new_tokens: int,
    question_aware: bool = False,
    prefill_chunk: int | None = None,
) -> list[str]:
    """:func:`generate` with an empty cache the caller made (and can inspect afterwards); always returns a list.

    Raises:
        ValueError: the cache already holds a context (make a new one, or ``cache.reset()``), or as
            :func:`generate`.
    """
    contexts = [context] if isinstance(context, str) else list(context)
    if not contexts or any(not isinstance(c, str) or not c for c in contexts):
        raise ValueError("context must be a non-empty string or a list of non-empty strings")
    if cache.get_seq_length():
        raise ValueError(
            f"the cache already holds {cache.get_seq_length()} tokens of another context; pass a new cache "
            "(kvcompress.make_cache) or empty this one with cache.reset()"
        )
    selection = cache.pipeline.selection
    if question_aware and (selection is None or not selection.observe):
        raise ValueError(
            f"question_aware=True changes only methods that score tokens by attention (snapkv, h2o, tova, pyramidkv, "
            f"adakv); {cache.spec!r} does not, so the question could not change what it keeps: drop question_aware"
        )
    parts = [split_prompt(tokenizer, c, question) for c in contexts]
    device = model.device
    ctx = tokenizer([p[0] for p in parts], return_tensors="pt", padding=True, padding_side="left").to(device)
    asked = tokenizer(
        [p[1] for p in parts], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(device)
    ctx_ids, ctx_mask = ctx["input_ids"], ctx["attention_mask"]
    ask_ids, ask_mask = asked["input_ids"], asked["attention_mask"]
    if ask_ids.shape[1] == 0:  # nothing follows the context: hold back its last token to start decoding
        ctx_ids, ask_ids = ctx_ids[:, :-1], ctx_ids[:, -1:]
        ctx_mask, ask_mask = ctx_mask[:, :-1], ctx_mask[:, -1:]
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    total = ctx_ids.shape[1] + ask_ids.shape[1]
    if limit is not None and total + max_new_tokens > limit:
        fix = "shorten the context" if total >= limit else f"lower max_new_tokens to {limit - total} or shorten the context"
        raise ContextTooLongError(
            f"the prompt is {total} tokens and the answer may take {max_new_tokens} more, but the model accepts at "
            f"most {limit} positions; {fix}"
        )
    input_ids = torch.cat([ctx_ids, ask_ids], 1)
    with attach(model, cache):
        with cache.deferred() if question_aware else contextlib.nullcontext():
            prefill(model, ctx_ids, ctx_mask, cache, logits_to_keep=1, chunk=prefill_chunk)  # its logits are not used
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.cat([ctx_mask, ask_mask], 1),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **{cache_kwarg(model): cache},
        )
    return [a.strip() for a in tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)]
