"""Compress a context once, then ask questions that are not compressed, and decode answers.

:func:`compress` turns a context into a cache; :func:`ask` answers questions after it, each on a
fork that reads the compressed context without copying it; :func:`generate` is the two in one call.
:func:`split_prompt` and :func:`split_chat` say where a prompt (a context and a question, or a
conversation) is cut between the compressed part and the asked part. Answers are greedy unless a
:class:`~kvcompress.sampling.Sampler` chooses the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import LogitsProcessorList

from kvcompress.attach import attach
from kvcompress.cache import CompressedCache, make_cache
from kvcompress.models import cache_kwarg
from kvcompress.sampling import Sampler


class ContextTooLongError(ValueError):
    """The prompt (with the answer's tokens) does not fit in the model's position range."""


def split_prompt(tokenizer, context: str, question: str | None) -> tuple[str, str]:
    """Split the model's prompt into the part to compress (the context) and the part asked after it.

    With a chat template, the context sits inside the user turn and everything after it (question,
    end of turn, assistant header) is the uncompressed part. Without one, the question follows the
    context after a blank line.

    The template is cut where it puts the context, found by rendering it once with a marker in the
    context's place: never by searching for the context's text, which may also occur before it (in a
    default system prompt: "You", "a", "user").

    Raises:
        ValueError: the chat template changes the text around the context in a way that depends on it.
    """
    asked = f"\n\n{question}" if question else ""
    if not getattr(tokenizer, "chat_template", None):
        return context, asked
    return _cut(tokenizer, [], context, asked)


def split_chat(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """Split a conversation (``{"role", "content"}`` dicts; roles ``system``, ``user``, ``assistant``) into the
    part to compress and the part asked after it, as :func:`split_prompt` splits a context and a question.

    The rule: the last message must be the user's, and it is the question; the conversation before it
    is the context. Consecutive user messages share one user turn, joined by blank lines, and the
    question then follows the earlier ones in that turn. A conversation of one user message has no
    question: that message is the context (:func:`split_prompt` with no question). A conversation of
    user messages only is therefore :func:`split_prompt` of all but the last, joined, and the last.

    The cut is where the chat template puts the question, found with a marker, as in :func:`split_prompt`.

    Raises:
        ValueError: an unknown role, no final user message, system or assistant messages without a chat
            template, or a template that rewrites the text around the question.
    """
    roles = [m["role"] for m in messages]
    unknown = sorted(set(roles) - {"system", "user", "assistant"})
    if unknown or not messages or roles[-1] != "user":
        raise ValueError(
            f"a conversation is messages of roles system, user and assistant ending with the user's question (got roles "
            f"{roles}): the conversation before the last user message is compressed, and that message is asked after it"
        )
    first = len(roles) - 1  # the first of the user messages that end the conversation
    while first and roles[first - 1] == "user":
        first -= 1
    texts = [m["content"] for m in messages[first:]]
    if first == 0:  # user messages only
        if len(texts) == 1:
            return split_prompt(tokenizer, texts[0], None)
        return split_prompt(tokenizer, "\n\n".join(texts[:-1]), texts[-1])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "system and assistant messages are written into the prompt by the tokenizer's chat template, and this "
            "tokenizer has none: send user messages only"
        )
    earlier, question = "\n\n".join(texts[:-1]), texts[-1]
    return _cut(tokenizer, messages[:first], earlier, f"\n\n{question}" if earlier else question)


def _cut(tokenizer, history: list[dict], context: str, asked: str) -> tuple[str, str]:
    """The chat prompt of ``history`` and a last user turn ``context + asked``, cut after ``context``."""
    render = lambda content: tokenizer.apply_chat_template(  # noqa: E731
        [*history, {"role": "user", "content": content + asked}], add_generation_prompt=True, tokenize=False
    )
    text, marked = render(context), render(_MARKER)
    parts = marked.split(_MARKER)  # [template before the context, template after it]
    if len(parts) != 2 or not text.startswith(parts[0]) or not text[len(parts[0]) :].endswith(parts[1]):
        raise ValueError(
            "the tokenizer's chat template does not place the user's text as given (it is repeated or rewritten "
            "around it), so the context cannot be cut out of the prompt; use a tokenizer without this template"
        )
    end = len(text) - len(parts[1])  # the context as the template wrote it (a template may trim it)
    return text[:end], text[end:]


_MARKER = "\x00kvcompress context\x00"  # text no user writes: where the chat template puts the context


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: CompressedCache,
    logits_to_keep: int = 0,
    chunk: int | None = None,
    tokenizer=None,
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
    A selection that replays the context (KVzip, :meth:`~kvcompress.protocols.Selection.replay_context`)
    needs the ``tokenizer``: the context is then held uncompressed (fed in chunks of ``chunk`` if given),
    replayed by the selection, and compressed.

    Raises:
        ValueError: the cache's method replays the context and no ``tokenizer`` was given.
    """
    for logits in prefill_chunks(model, input_ids, attention_mask, cache, logits_to_keep, chunk, tokenizer):
        pass
    return logits


def prefill_chunks(
    model, input_ids, attention_mask, cache: CompressedCache, logits_to_keep: int = 0, chunk: int | None = None, tokenizer=None,
    start: int = 0,
) -> Iterator[torch.Tensor]:
    """:func:`prefill` one chunk at a time: yields each chunk's logits once the chunk is in the cache, so a
    caller can do other work between chunks (a server decodes its running sequences); the last yield
    comes after the context is compressed. Call it inside :func:`kvcompress.attach` (kept open while
    the generator runs). ``start``: the cache already holds the first ``start`` tokens of ``input_ids``
    (a cache that continues its context; only a method that does not evict, see :func:`compressing`)."""
    selection = cache.pipeline.selection if isinstance(cache, CompressedCache) else None  # kvpress rows: a DynamicCache
    if selection is not None and selection.replay and not cache.deferring:
        if tokenizer is None:
            raise ValueError(
                f"{selection.name} scores the context by replaying it, which needs the tokenizer: pass "
                "prefill(..., tokenizer=tokenizer) (kvcompress.compress and generate do)"
            )
        with cache.deferred():
            for logits in _forward(model, input_ids, attention_mask, cache, logits_to_keep, chunk):
                pass
        selection.replay_context(model, tokenizer, input_ids, attention_mask, cache)
        yield logits
        return
    yield from _forward(model, input_ids, attention_mask, cache, logits_to_keep, chunk, start)


def _forward(model, input_ids, attention_mask, cache, logits_to_keep, chunk, start: int = 0) -> Iterator[torch.Tensor]:
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {cache_kwarg(model): cache}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    length = input_ids.shape[1]
    if chunk and chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if not chunk or length - start <= chunk:
        yield model(
            input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=position_ids[:, start:], use_cache=True, **kwargs
        ).logits
        return
    with cache.prefilling(attention_mask.sum(-1)):
        for first in range(start, length, chunk):
            stop = min(first + chunk, length)
            yield model(
                input_ids=input_ids[:, first:stop],
                attention_mask=attention_mask[:, :stop],
                position_ids=position_ids[:, first:stop],
                use_cache=True,
                **kwargs,
            ).logits


def _encode(tokenizer, texts: list[str], device, special: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` left-padded ids and padding mask of ``texts``."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=special).to(device)
    return enc["input_ids"], enc["attention_mask"]


def _contexts(context: str | list[str]) -> list[str]:
    contexts = [context] if isinstance(context, str) else list(context)
    if not contexts or any(not isinstance(c, str) or not c for c in contexts):
        raise ValueError("context must be a non-empty string or a list of non-empty strings")
    return contexts


def check_room(model, tokens: int, max_new_tokens: int) -> None:
    """Raise :class:`ContextTooLongError` unless ``tokens`` of prompt plus ``max_new_tokens`` fit the model's positions."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and tokens + max_new_tokens > limit:
        fix = "shorten the context" if tokens >= limit else f"lower max_new_tokens to {limit - tokens} or shorten the context"
        raise ContextTooLongError(
            f"the prompt is {tokens} tokens and the answer may take {max_new_tokens} more, but the model accepts at "
            f"most {limit} positions; {fix}"
        )


@torch.no_grad()
def compress(
    model,
    tokenizer,
    context: str | list[str],
    cache: CompressedCache | str = "none",
    prefill_chunk: int | None = None,
    templated: bool = False,
) -> CompressedCache:
    """Compress one context, or a batch of them (left-padded), into a cache that questions can then be
    asked of, many times (:func:`ask`), and that can be saved (``cache.save``) and reloaded.

    Args:
        cache: an empty cache for ``model`` (:func:`kvcompress.make_cache`), or a method spec to make one; or a
            cache holding an earlier context that starts this one (a conversation's earlier turns), compressed by a
            method that does not evict and not read by forks (:meth:`~kvcompress.cache.CompressedCache.copy` one
            that is): only the tokens after it are fed, as one more chunk of a chunked prefill would be.
        prefill_chunk: see :func:`generate`.
        templated: each context is already the model's prompt up to the cut, as the first part of
            :func:`split_prompt` or :func:`split_chat` (a conversation's context), and is used as it is.

    Returns:
        The cache, holding the compressed context and its token ids (``cache.context``).

    Raises:
        ValueError: an empty context, or a cache that already holds a context that it cannot continue into this
            one (another context, a batch, an evicting method, a cache read by forks).
        ContextTooLongError: the context does not fit the model's positions.
    """
    cache = make_cache(cache, model) if isinstance(cache, str) else cache
    for _ in compressing(model, tokenizer, context, cache, prefill_chunk, templated):
        pass
    return cache


@torch.no_grad()
def compressing(
    model, tokenizer, context: str | list[str], cache: CompressedCache, prefill_chunk: int | None = None, templated: bool = False
) -> Iterator[int]:
    """:func:`compress` into ``cache`` one chunk of ``prefill_chunk`` tokens at a time: yields the tokens fed
    so far after each chunk, so a caller can run other sequences between chunks (``kvcompress serve``
    admits a request so); when it ends, the cache holds the compressed context. Raises as :func:`compress`
    does, on its first step."""
    contexts = _contexts(context)
    texts = contexts if templated else [split_prompt(tokenizer, c, None)[0] for c in contexts]
    ids, mask = _encode(tokenizer, texts, model.device, special=True)
    held = _continued(cache, ids, mask)
    check_room(model, ids.shape[1], 0)
    # Without a chat template nothing may follow the context: its last token is held back, to be fed
    # with the question (or alone, to continue the text), so an answer always starts from a step.
    fed = ids.shape[1] - (0 if getattr(tokenizer, "chat_template", None) else 1)
    if fed > held:
        with attach(model, cache):
            chunks = prefill_chunks(
                model, ids[:, :fed], mask[:, :fed], cache, logits_to_keep=1, chunk=prefill_chunk, tokenizer=tokenizer, start=held
            )
            for i, _ in enumerate(chunks):
                yield min(fed, held + (i + 1) * prefill_chunk) if prefill_chunk else fed
    cache.context = (ids, mask)


def _continued(cache: CompressedCache, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Tokens of the context ``ids`` that ``cache`` already holds: 0 for an empty cache, else those of the earlier
    context it holds, which must start ``ids`` (a conversation's earlier turns), in a cache that may take more."""
    held = cache.get_seq_length()
    if not held:
        return 0
    earlier = cache.context[0] if cache.context is not None else None
    if earlier is None or ids.shape[0] != 1 or earlier.shape[0] != 1 or not bool(mask.all()):
        raise ValueError(
            f"the cache already holds {held} tokens of another context; pass a new cache (kvcompress.make_cache) or "
            "empty this one with cache.reset() (a cache continues only one context of its own that starts the new one)"
        )
    if earlier.shape[1] > ids.shape[1] or not torch.equal(ids[0, : earlier.shape[1]], earlier[0].to(ids.device)):
        raise ValueError(
            f"the cache already holds {held} tokens of a context that does not start this one; pass a new cache "
            "(kvcompress.make_cache) or empty this one with cache.reset()"
        )
    if cache.pipeline.selection is not None:
        raise ValueError(
            f"{cache.spec!r} evicts by scores over the whole context, so a compressed context cannot be continued: "
            "compress the longer context into a new cache"
        )
    if cache.forked:
        raise ValueError("this cache's context is read by its forks and may not change: continue cache.copy()")
    return held


def asked_part(tokenizer, question: str | None) -> str:
    """What follows a compressed context in the model's prompt: the question and, with a chat
    template, the end of the user turn and the assistant header (see :func:`split_prompt`)."""
    return split_prompt(tokenizer, _MARKER, question)[1]


@torch.no_grad()
def ask(
    model,
    tokenizer,
    cache: CompressedCache,
    question: str | None | list[str | None],
    max_new_tokens: int = 64,
    streamer=None,
    stopping_criteria=None,
    sampler: Sampler | None = None,
    templated: bool = False,
) -> str | list[str]:
    """Answer after a compressed context (:func:`compress`, or :func:`kvcompress.load_cache`), greedily
    unless a ``sampler`` chooses the tokens.

    The context is not compressed again nor copied: each question continues a fork of the cache
    (:meth:`~kvcompress.cache.CompressedCache.fork`) that reads the context as it is held and stores
    only the question's and the answer's tokens. With a cache of one context, a list of questions is
    answered as one batch over that context; with a batch of contexts, one question each (or one for all).

    ``streamer``: a transformers ``BaseStreamer``, handed to ``model.generate``: its ``put`` gets the
    prompt's ``(B, T)`` ids, then each step's ``(B,)`` new tokens (every row: ``kvcompress serve``
    streams a batch of questions with it), and ``end()`` once generation stops. ``stopping_criteria``:
    a list of transformers ``StoppingCriteria``, also handed to ``model.generate`` (a row they mark done
    decodes no further; ``kvcompress serve`` ends a cancelled request's row so). ``sampler``: a
    :class:`~kvcompress.sampling.Sampler` with one row per question (greedy rows included), e.g.
    ``Sampler([(Sampling(temperature=0.7, seed=1), len(questions))])``. ``templated``: each question is
    already the prompt's asked part, as the second part of :func:`split_prompt` or :func:`split_chat`.

    Returns:
        The answer, or a list of answers for a list of questions or a batch of contexts.

    Raises:
        ValueError: the cache holds no compressed context, or questions do not match its contexts.
        ContextTooLongError: a question and ``max_new_tokens`` do not fit the model's positions.
    """
    if cache.context is None:
        raise ValueError("the cache holds no compressed context: make it with kvcompress.compress or kvcompress.load_cache")
    ids, mask = cache.context
    rows = ids.shape[0]
    questions = question if isinstance(question, list) else [question]
    if not questions:
        raise ValueError("give at least one question")
    if rows == 1:
        copies = len(questions)
    elif len(questions) in (1, rows):
        copies, questions = 1, questions * (rows // len(questions))
    else:
        raise ValueError(f"the cache holds {rows} contexts: ask one question, or one per context, not {len(questions)}")
    fork = cache.fork(copies)
    ids, mask = fork.context
    asked = questions if templated else [asked_part(tokenizer, q) for q in questions]
    asked_ids, asked_mask = _encode(tokenizer, asked, model.device, special=False)
    seen = cache.get_seq_length()
    # What the cache has not seen of the context (nothing, or a last token held back) goes with the question.
    input_ids, attention_mask = torch.cat([ids, asked_ids], 1), torch.cat([mask, asked_mask], 1)
    if input_ids.shape[1] == seen:
        raise ValueError("nothing follows the compressed context: ask a question")
    check_room(model, input_ids.shape[1], max_new_tokens)
    with attach(model, fork):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=stopping_criteria,
            logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
            **{cache_kwarg(model): fork},
        )
    answers = [a.strip() for a in tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)]
    return answers if isinstance(question, list) or rows > 1 else answers[0]


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
    """Compress ``context`` with ``method``, then ask ``question`` (not compressed) and answer greedily:
    :func:`compress` then :func:`ask`, or, question-aware, the context compressed with the question.

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
    """:func:`generate` with an empty cache the caller made (and can inspect afterwards: it holds the
    compressed context); always returns a list.

    Raises:
        ValueError: the cache already holds a context (make a new one, or ``cache.reset()``), or as
            :func:`generate`.
    """
    contexts = _contexts(context)
    if not question_aware:
        compress(model, tokenizer, contexts, cache, prefill_chunk)
        answers = ask(model, tokenizer, cache, question, max_new_tokens)
        return answers if isinstance(answers, list) else [answers]
    selection = cache.pipeline.selection
    if selection is None or not selection.observe:
        raise ValueError(
            f"question_aware=True changes only methods that score tokens by attention (snapkv, h2o, tova, pyramidkv, "
            f"adakv); {cache.spec!r} does not, so the question could not change what it keeps: drop question_aware"
        )
    if selection.replay:
        raise ValueError(f"{cache.spec!r} scores the context by replaying it, whatever the question: drop question_aware")
    if cache.get_seq_length():
        raise ValueError(
            f"the cache already holds {cache.get_seq_length()} tokens of another context; pass a new cache "
            "(kvcompress.make_cache) or empty this one with cache.reset()"
        )
    parts = [split_prompt(tokenizer, c, question) for c in contexts]
    ctx_ids, ctx_mask = _encode(tokenizer, [p[0] for p in parts], model.device, special=True)
    ask_ids, ask_mask = _encode(tokenizer, [p[1] for p in parts], model.device, special=False)
    input_ids = torch.cat([ctx_ids, ask_ids], 1)
    check_room(model, input_ids.shape[1], max_new_tokens)
    with attach(model, cache):
        with cache.deferred():  # the context waits for the question's step to be compressed with it
            prefill(model, ctx_ids, ctx_mask, cache, logits_to_keep=1, chunk=prefill_chunk)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.cat([ctx_mask, ask_mask], 1),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **{cache_kwarg(model): cache},
        )
    return [a.strip() for a in tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)]
