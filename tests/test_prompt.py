"""split_prompt: the prompt is cut where the chat template puts the context, whatever the context's text."""

from __future__ import annotations

import pytest

from kvcompress.generation import asked_part, split_chat, split_prompt

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


class _Turns:
    """A tokenizer stub whose chat template writes every message as its own turn (ChatML-like)."""

    chat_template = "stub"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        turns = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in messages)
        return turns + ("<s>assistant\n" if add_generation_prompt else "")


def test_a_conversation_is_cut_before_its_last_user_message():
    tokenizer = _Turns()
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The code is 41."},
        {"role": "assistant", "content": "Noted: 41."},
        {"role": "user", "content": "What is the code?"},
    ]
    context, asked = split_chat(tokenizer, chat)
    assert context == "<s>system\nBe brief.</s>\n<s>user\nThe code is 41.</s>\n<s>assistant\nNoted: 41.</s>\n<s>user\n"
    assert asked == "What is the code?</s>\n<s>assistant\n"
    assert context + asked == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    # User messages before the question share its turn, after a blank line, as split_prompt puts a question.
    two = split_chat(tokenizer, [*chat[:3], {"role": "user", "content": "A note."}, chat[3]])
    assert two[0].endswith("<s>user\nA note.") and two[1] == "\n\nWhat is the code?</s>\n<s>assistant\n"
    # A question whose text occurs earlier (here, in a turn header) is still cut at its own place.
    system = [{"role": "system", "content": "user"}, {"role": "user", "content": "user"}]
    assert split_chat(tokenizer, system) == ("<s>system\nuser</s>\n<s>user\n", "user</s>\n<s>assistant\n")


def test_user_messages_alone_split_as_before():
    tokenizer = _Template()
    users = [{"role": "user", "content": text} for text in ("Doc one.", "Doc two.", "Who?")]
    assert split_chat(tokenizer, users) == split_prompt(tokenizer, "Doc one.\n\nDoc two.", "Who?")
    assert split_chat(tokenizer, users[:1]) == split_prompt(tokenizer, "Doc one.", None)


@pytest.mark.parametrize(
    "roles, match",
    [(["user", "assistant"], "ending with the user's question"), (["tool", "user"], "roles system, user and assistant")],
)
def test_a_conversation_that_does_not_end_with_a_user_message_is_refused(roles, match):
    with pytest.raises(ValueError, match=match):
        split_chat(_Turns(), [{"role": role, "content": "x"} for role in roles])


def test_system_and_assistant_messages_need_a_chat_template():
    class Plain:
        chat_template = None

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="has none: send user messages only"):
        split_chat(Plain(), chat)
    assert split_chat(Plain(), chat[1:]) == ("Hi", "")
