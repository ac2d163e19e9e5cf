"""split_prompt: the prompt is cut where the chat template puts the context, whatever the context's text."""

from __future__ import annotations

import pytest

from kvcompress.generation import asked_part, split_prompt

# Words of SmolLM2's default system prompt ("You are a helpful AI assistant ...") and of its role headers.
SHARED_WORDS = ["You", "a", "user", "assistant"]


class _Template:
    """A tokenizer stub with a chat template that starts with a system prompt and trims the user's text."""

    chat_template = "stub"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        (message,) = messages
        return f"<s>system\nYou are a user's assistant</s>\n<s>user\n{message['content'].strip()}</s>\n<s>assistant\n"


@pytest.mark.parametrize("context", SHARED_WORDS)
def test_a_context_that_also_occurs_in_the_template_is_cut_after_itself(context):
    tokenizer = _Template()
    before, after = split_prompt(tokenizer, context, "Who?")
    assert before == f"<s>system\nYou are a user's assistant</s>\n<s>user\n{context}"
    assert after == "\n\nWho?</s>\n<s>assistant\n" and after == asked_part(tokenizer, "Who?")
    alone, rest = split_prompt(tokenizer, context, None)
    assert alone == before and rest == "</s>\n<s>assistant\n"
    assert split_prompt(tokenizer, f"  {context}", None)[0] == before  # the context as the template wrote it


def test_a_template_that_rewrites_the_text_around_the_context_is_refused():
    tokenizer = _Template()
    tokenizer.apply_chat_template = lambda messages, **_: f"{len(messages[0]['content'])}:{messages[0]['content']}"
    with pytest.raises(ValueError, match="cannot be cut out of the prompt"):
        split_prompt(tokenizer, "You", None)


@pytest.mark.model
@pytest.mark.parametrize("context", SHARED_WORDS)
def test_the_default_models_template_keeps_the_users_text_in_the_context(smol, context):
    _, tokenizer = smol
    before, after = split_prompt(tokenizer, context, "Why?")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{context}\n\nWhy?"}], add_generation_prompt=True, tokenize=False
    )
    assert before + after == full
    assert before.endswith(f"user\n{context}") and "You are a helpful" in before
    assert after.startswith("\n\nWhy?")
