"""``kvcompress serve`` with what chat clients send: system/user/assistant conversations, sampling (temperature,
top_p, top_k, seed), stop texts, n choices, logprobs, and /metrics in Prometheus' format. A real server on a local port, as in
test_serve.py; short answers and tiny contexts."""

from __future__ import annotations

import pytest

import kvcompress
from kvcompress.generation import split_chat

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from kvcompress.serve import create_app  # noqa: E402
from test_serve import METHOD, _metrics, _serving, _sse  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.xdist_group("serve")]

TOKENS = 8


def _city_chat(city: str) -> list[dict]:
    """A conversation whose answer needs a fact only its assistant turn holds."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a city."},
        {"role": "assistant", "content": f"{city}."},
        {"role": "user", "content": "Repeat the city you named."},
    ]


OPEN = [{"role": "user", "content": "Write a short poem."}, {"role": "user", "content": "About the sea."}]


@pytest.fixture(scope="module")
def server(smol, tmp_path_factory):
    model, tokenizer = smol
    app = create_app(model, tokenizer, METHOD, name="smol", store=tmp_path_factory.mktemp("store"))
    with _serving(app) as url:
        yield url, app


def _chat(url: str, messages: list[dict], **fields) -> dict:
    body = {"model": "smol", "messages": messages, "max_tokens": TOKENS, **fields}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _answers(reply: dict) -> list[str]:
    return [choice["message"]["content"] for choice in reply["choices"]]


def _streamed(url: str, path: str, body: dict) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's text joined from its pieces, and its finish_reason."""
    texts, finishes = {}, {}
    with httpx.stream("POST", f"{url}{path}", json={"model": "smol", "stream": True, **body}, timeout=120) as response:
        assert response.status_code == 200
        for chunk in _sse(response.iter_lines()):
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
                texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
    return texts, finishes


def test_a_conversation_is_answered_after_the_conversation_before_its_last_user_message(server, smol):
    url, app = server
    model, tokenizer = smol
    for city in ("Paris", "Tokyo", "Cairo"):
        chat = _city_chat(city)
        before = _metrics(url)
        reply = _chat(url, chat)
        assert city.lower() in _answers(reply)[0].lower()  # the assistant turn's fact reached the answer

        context, asked = split_chat(tokenizer, chat)
        assert f"{city}." in context and "Repeat" not in context and asked.startswith("Repeat the city you named.")
        ids = tokenizer(context)["input_ids"]
        assert reply["usage"]["prompt_tokens"] == len(ids) + len(tokenizer(asked, add_special_tokens=False)["input_ids"])
        # What the server compressed and keeps is exactly that context's tokens.
        held = [cache.context[0][0].tolist() for cache, _ in app.state.store.memory.values()]
        assert ids in held
        cache = kvcompress.compress(model, tokenizer, context, METHOD, templated=True)
        assert _answers(reply)[0] == kvcompress.ask(model, tokenizer, cache, [asked], TOKENS, templated=True)[0]

        again = _chat(url, chat)  # the same conversation: its context is reused
        after = _metrics(url)
        assert _answers(again) == _answers(reply) and after["prefills"] == before["prefills"] + 1
        assert after["memory_hits"] == before["memory_hits"] + 1
    # The next turn's context is the whole earlier conversation: it starts with the context kept above, so
    # the server continues a copy of that one and prefills only the new tokens, as kvcompress.compress does.
    turn = [*chat, {"role": "assistant", "content": _answers(reply)[0]}, {"role": "user", "content": "Spell it."}]
    next_turn = _chat(url, turn, max_tokens=4)
    now = _metrics(url)
    context, asked = split_chat(tokenizer, turn)
    earlier, _ = split_chat(tokenizer, chat)
    grown = tokenizer(context)["input_ids"]
    assert now["prefills"] == after["prefills"] + 1 and now["prefix_hits"] == after["prefix_hits"] + 1
    assert now["reused_tokens"] - after["reused_tokens"] == len(tokenizer(earlier)["input_ids"]) < len(grown)
    continued = kvcompress.compress(model, tokenizer, context, kvcompress.compress(model, tokenizer, earlier, METHOD, templated=True), templated=True)
    assert _answers(next_turn)[0] == kvcompress.ask(model, tokenizer, continued, [asked], 4, templated=True)[0]
    assert grown in [cache.context[0][0].tolist() for cache, _ in app.state.store.memory.values()]


def test_a_seed_gives_the_same_sampled_answer_and_other_seeds_or_none_differ(server):
    url, _ = server
    sampled = {"temperature": 1.3, "max_tokens": 6}
    first = _answers(_chat(url, OPEN, **sampled, seed=11))
    assert _answers(_chat(url, OPEN, **sampled, seed=11)) == first
    others = set()
    for seed in range(4):  # bounded: four other seeds
        others.add(_answers(_chat(url, OPEN, **sampled, seed=seed))[0])
        if others - set(first):
            break
    assert others - set(first), "four other seeds all gave the seed-11 answer"
    unseeded = set()
    for _ in range(4):  # without a seed each request draws its own
        unseeded.add(_answers(_chat(url, OPEN, **sampled))[0])
        if len(unseeded) > 1:
            break
    assert len(unseeded) > 1, "four unseeded requests all gave one answer"


def test_temperature_0_and_top_k_1_are_greedy(server):
    url, _ = server
    greedy = _answers(_chat(url, OPEN))
    assert _answers(_chat(url, OPEN, temperature=0, seed=3, top_p=0.5)) == greedy
    assert _answers(_chat(url, OPEN, temperature=1.3, top_k=1, seed=4)) == greedy
    completion = {"model": "smol", "prompt": OPEN[0]["content"], "question": OPEN[1]["content"], "max_tokens": TOKENS}
    sampled = httpx.post(f"{url}/v1/completions", json={**completion, "temperature": 0.0, "seed": 9}, timeout=120).json()
    assert sampled["choices"][0]["text"] == greedy[0]  # the same split: one user turn, the question after a blank line


def test_a_stop_text_cuts_the_answer_before_it_streamed_or_not(server):
    url, _ = server
    greedy = _answers(_chat(url, OPEN, max_tokens=12))[0]
    words = greedy.split()
    assert len(words) >= 4, greedy
    stop = f" {words[2]}"
    expected = greedy[: greedy.index(stop)].strip()
    reply = _chat(url, OPEN, max_tokens=12, stop=[stop, "never said"])
    assert _answers(reply) == [expected] and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 12  # decoding ended at the stop text
    texts, finishes = _streamed(url, "/v1/chat/completions", {"messages": OPEN, "max_tokens": 12, "stop": stop})
    assert texts == {0: expected} and finishes == {0: "stop"}  # no piece held the stop text
    body = {"prompt": OPEN[0]["content"], "question": OPEN[1]["content"], "max_tokens": 12, "stop": stop}
    done = httpx.post(f"{url}/v1/completions", json={"model": "smol", **body}, timeout=120).json()["choices"][0]
    assert (done["text"], done["finish_reason"]) == (expected, "stop")
    assert _streamed(url, "/v1/completions", body) == ({0: expected}, {0: "stop"})


def test_n_gives_n_choices_over_one_context(server):
    url, _ = server
    greedy = _answers(_chat(url, OPEN))[0]
    assert _answers(_chat(url, OPEN, n=2)) == [greedy, greedy]
    reply = _chat(url, OPEN, n=2, temperature=1.3, seed=5, max_tokens=6)
    assert [c["index"] for c in reply["choices"]] == [0, 1] and reply["usage"]["completion_tokens"] <= 12
    texts, finishes = _streamed(url, "/v1/chat/completions", {"messages": OPEN, "n": 2, "temperature": 1.3, "seed": 5, "max_tokens": 6})
    assert texts == dict(enumerate(_answers(reply))) and set(finishes) == {0, 1}  # the same seed, streamed


def test_logprobs_list_each_token_with_its_most_likely_alternatives(server):
    url, _ = server
    reply = _chat(url, OPEN, logprobs=True, top_logprobs=3)
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content).strip() == choice["message"]["content"]
    for token in content:
        alternatives = [t["logprob"] for t in token["top_logprobs"]]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True) and alternatives[0] <= 0
        assert token["logprob"] == pytest.approx(alternatives[0])  # greedy: the most likely token
        assert token["bytes"] == list(token["token"].encode())
    assert _chat(url, OPEN)["choices"][0]["logprobs"] is None  # only when asked for


def test_the_openai_client_sends_sampling_fields_and_a_refused_one_names_itself(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smol", messages=_city_chat("Paris"), max_tokens=TOKENS, temperature=0.9, top_p=0.9, seed=5, n=2,
        stop=["\n"], logprobs=True, top_logprobs=1,
    )  # fmt: skip
    assert len(reply.choices) == 2 and all(len(c.logprobs.content[0].top_logprobs) == 1 for c in reply.choices)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="smol", messages=OPEN, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smol", messages=OPEN, temperature=2.5)


def test_metrics_are_in_prometheus_text_format_and_json_on_request(server):
    parser = pytest.importorskip("prometheus_client.parser")
    url, _ = server
    long_enough = [{"role": "system", "content": "Answer in verse, in one line, about the sea. " * 6}, *OPEN]  # > residual + group
    _chat(url, long_enough, max_tokens=1)
    text = httpx.get(f"{url}/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in parser.text_string_to_metric_families(text.text)}
    counts = httpx.get(f"{url}/metrics", headers={"Accept": "application/json"}).json()
    assert families["kvcompress_requests"].type == "counter" and families["kvcompress_kept_bytes"].type == "gauge"
    assert families["kvcompress_requests"].samples[0].value <= counts["requests"]
    assert families["kvcompress_kept_bytes"].samples[0].value == counts["kept_bytes"] > 0
    assert "kvcompress_store_budget" not in families  # no limit: no figure
    pages = {sample.labels["tier"]: sample.value for sample in families["kvcompress_pages"].samples}
    assert set(pages) == {"running", "memory", "disk"}
    assert pages["memory"] == counts["kept_pages"] > 0 and pages["running"] == counts["active_pages"] == 0  # nothing runs
    assert httpx.get(f"{url}/metrics", params={"format": "xml"}).status_code == 400


def test_a_conversation_continues_from_the_context_an_earlier_server_saved(smol, tmp_path):
    """Contexts saved at shutdown are found by their prefixes after a restart: the next turn is continued."""
    model, tokenizer = smol
    chat = _city_chat("Lima")
    chat[0]["content"] = "Be brief: answer in one word, with no sentence around it. " * 4  # a context that fills a page
    with _serving(create_app(model, tokenizer, METHOD, name="smol", store=tmp_path)) as url:
        answer = _answers(_chat(url, chat))[0]
        first = _metrics(url)
    turn = [*chat, {"role": "assistant", "content": answer}, {"role": "user", "content": "Spell it."}]
    with _serving(create_app(model, tokenizer, METHOD, name="smol", store=tmp_path)) as url:
        found = _metrics(url)  # the saved contexts' pages, read from their files' headers
        assert found["disk_pages"] == first["kept_pages"] + first["disk_pages"] > 0 and found["kept_pages"] == 0
        _chat(url, turn, max_tokens=2)
        metrics = _metrics(url)
    earlier = tokenizer(split_chat(tokenizer, chat)[0])["input_ids"]
    assert metrics["prefix_hits"] == 1 and metrics["reused_tokens"] == len(earlier)
