"""Compress a context once, then ask a question that is not compressed, and decode an answer."""

from __future__ import annotations

import contextlib
import inspect

import torch

from kvcompress.cache import CompressedCache, make_cache


class ContextTooLongError(ValueError):
    """The prompt does not fit in the model's position range."""


def cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward``: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: CompressedCache, logits_to_keep: int = 0
) -> torch.Tensor:
    """Run ``input_ids`` through the model into ``cache`` (compressing it); return the logits.

    Positions come from the padding mask, so a left-padded row gets the positions it has alone.
    ``logits_to_keep=n`` computes only the last ``n`` positions' logits (0: all), which spares a
    ``(B, T, vocab)`` tensor when only the next token matters.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {cache_kwarg(model): cache}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
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
) -> str | list[str]:
    """Compress ``context`` with ``method``, then ask ``question`` (not compressed) and answer greedily.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (padding side is set to left for batches).
        context: one context, or a list of contexts answered as a batch.
        question: asked after each context; None to continue the context.
        method: compression spec, e.g. ``"streaming:window=1024+kivi:bits=4"``.
        max_new_tokens: answer length limit.
        question_aware: compress the context only once the question has been read, so methods
            that score tokens by attention (SnapKV, H2O, ...) see the question (SnapKV's original
            setting, for one-shot document Q&A). The default compresses the context on its own,
            so the compressed context could serve any question.

    Returns:
        The answer, or a list of answers for a list of contexts.

    Raises:
        ContextTooLongError: the prompt exceeds the model's maximum position.
        SpecError: bad method spec.
    """
    answers = answer(model, tokenizer, context, question, make_cache(method, model), max_new_tokens, question_aware)
    return answers[0] if isinstance(context, str) else answers


def answer(
    model,
    tokenizer,
    context: str | list[str],
    question: str | None,
    cache: CompressedCache,
    max_new_tokens: int,
    question_aware: bool = False,
) -> list[str]:
    """:func:`generate` with a cache the caller made (and can inspect afterwards); always returns a list."""
    contexts = [context] if isinstance(context, str) else list(context)
    if not contexts or any(not isinstance(c, str) or not c for c in contexts):
        raise ValueError("context must be a non-empty string or a list of non-empty strings")
    parts = [split_prompt(tokenizer, c, question) for c in contexts]
    tokenizer.padding_side = "left"
    device = model.device
    ctx = tokenizer([p[0] for p in parts], return_tensors="pt", padding=True).to(device)
    asked = tokenizer([p[1] for p in parts], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ctx_ids, ctx_mask = ctx["input_ids"], ctx["attention_mask"]
    ask_ids, ask_mask = asked["input_ids"], asked["attention_mask"]
    if ask_ids.shape[1] == 0:  # nothing follows the context: hold back its last token to start decoding
        ctx_ids, ask_ids = ctx_ids[:, :-1], ctx_ids[:, -1:]
        ctx_mask, ask_mask = ctx_mask[:, :-1], ctx_mask[:, -1:]
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    total = ctx_ids.shape[1] + ask_ids.shape[1]
    if limit is not None and total > limit:
        raise ContextTooLongError(
            f"the prompt is {total} tokens but the model accepts at most {limit}; shorten the context"
        )
    with cache.deferred() if question_aware else contextlib.nullcontext():
        prefill(model, ctx_ids, ctx_mask, cache, logits_to_keep=1)  # its logits are not used
    input_ids = torch.cat([ctx_ids, ask_ids], 1)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.cat([ctx_mask, ask_mask], 1),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **{cache_kwarg(model): cache},
    )
    return [a.strip() for a in tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)]
