"""``kvcompress serve``: the real server on a local port, spoken to over HTTP (httpx and the openai client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import kvcompress

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from kvcompress.generation import asked_part
from kvcompress.models import model_summary
from kvcompress.serve import ContextStore, Engine, Job, Metrics, create_app, parse_size

pytestmark = [pytest.mark.model, pytest.mark.xdist_group("serve")]  # one worker: one server for the module

METHOD = "kivi:bits=4,residual=16"
DOCS = [
    "The harbour town of Elm kept its records in a stone tower. The keeper, Ada Brook, wrote down every ship.",
    "In the spring of 1851 the ship Aurora arrived at Elm with a cargo of salt and a red flag.",
    "Mount Corra is the tallest peak of the Vell range; its glacier feeds the river Sand.",
]
QUESTIONS = ["Who was the keeper?", "What did the ship carry?"]
TOKENS = 3
JSON = {"Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(app):
    """Run ``app`` under uvicorn in a thread on a free port; yield its base URL; shut it down (lifespan too)."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(smol, tmp_path_factory):
    model, tokenizer = smol
    app = create_app(model, tokenizer, METHOD, name="smol", store=tmp_path_factory.mktemp("store"), max_body_bytes=1 << 20)
    with _serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def expected(smol):
    """Answers of the library itself, one request at a time: {(doc, question): answer}."""
    model, tokenizer = smol
    out = {}
    for doc in DOCS[:2]:
        cache = kvcompress.compress(model, tokenizer, doc, METHOD)
        for q in [*QUESTIONS, None]:
            out[doc, q] = kvcompress.ask(model, tokenizer, cache, q, max_new_tokens=TOKENS)
    return out


def _metrics(url: str) -> dict:
    return httpx.get(f"{url}/metrics", params={"format": "json"}).json()


def test_answers_equal_the_library_and_a_document_sent_again_is_not_prefilled(server, expected, smol):
    url, _ = server
    doc, q = DOCS[0], QUESTIONS[0]
    before = _metrics(url)
    body = {"model": "smol", "prompt": doc, "question": q, "max_tokens": TOKENS, "temperature": 0}
    first = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == expected[doc, q]
    usage = first.json()["usage"]
    assert (
        0 < usage["completion_tokens"] <= TOKENS and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    after_first = _metrics(url)
    assert after_first["prefills"] == before["prefills"] + 1 and after_first["prefill_seconds"] > before["prefill_seconds"]

    chat = {
        "model": "smol",
        "messages": [{"role": "user", "content": doc}, {"role": "user", "content": QUESTIONS[1]}],
        "max_tokens": TOKENS,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).json()
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected[doc, QUESTIONS[1]]}
    alone = httpx.post(f"{url}/v1/completions", json={**body, "question": None}, timeout=120).json()
    assert alone["choices"][0]["text"] == expected[doc, None]
    one_message = {"model": "smol", "messages": [{"role": "user", "content": doc}], "max_tokens": TOKENS}
    assert (
        httpx.post(f"{url}/v1/chat/completions", json=one_message, timeout=120).json()["choices"][0]["message"]["content"]
        == expected[doc, None]
    )

    after = _metrics(url)
    assert after["prefills"] == after_first["prefills"]  # the same document three more times: no prefill
    assert after["memory_hits"] == after_first["memory_hits"] + 3
    assert after["decode_seconds"] > after_first["decode_seconds"] and after["kept_bytes"] > 0


def _sse(lines) -> list[dict]:
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_gives_the_same_answer_in_pieces(server, expected):
    url, _ = server
    doc, q = DOCS[1], QUESTIONS[1]
    chat = {
        "model": "smol",
        "messages": [{"role": "user", "content": doc}, {"role": "user", "content": q}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(response.iter_lines())
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == expected[doc, q]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["completion_tokens"] > 0
    body = {"model": "smol", "prompt": [doc], "question": QUESTIONS[0], "max_tokens": TOKENS, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        chunks = _sse(response.iter_lines())
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected[doc, QUESTIONS[0]]


def test_the_openai_client_talks_to_it(server, expected):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["smol"]
    doc = DOCS[0]
    done = client.completions.create(
        model="smol", prompt=doc, max_tokens=TOKENS, temperature=0, extra_body={"question": QUESTIONS[1]}
    )
    assert done.choices[0].text == expected[doc, QUESTIONS[1]]
    stream = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": doc}, {"role": "user", "content": QUESTIONS[0]}],
        max_tokens=TOKENS,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[doc, QUESTIONS[0]]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="smol", prompt=doc, presence_penalty=0.8)


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server):
    url, _ = server
    good = {"model": "smol", "prompt": DOCS[0], "max_tokens": 2}
    cases = [
        ({"content": b'{"model": "smol", "prompt": ', "headers": JSON}, 400, "invalid_json"),
        ({"content": b"[1, 2]", "headers": JSON}, 400, "invalid_value"),
        ({"json": {**good, "model": "other"}}, 404, "model_not_found"),
        ({"json": {**good, "prompt": "word " * 9000}}, 400, "context_length_exceeded"),
        ({"json": {**good, "max_tokens": 100_000}}, 400, "context_length_exceeded"),
        ({"json": {**good, "max_tokens": 0}}, 400, "invalid_value"),
        ({"json": {**good, "presence_penalty": 1.0}}, 400, "unsupported_parameter"),
        ({"json": {**good, "frequency_penalty": -0.5}}, 400, "unsupported_parameter"),
        ({"json": {**good, "logprobs": 2}}, 400, "unsupported_parameter"),  # chat only
        ({"json": {**good, "temperature": 3.0}}, 400, "invalid_value"),
        ({"json": {**good, "top_p": -0.1}}, 400, "invalid_value"),
        ({"json": {**good, "n": 17}}, 400, "invalid_value"),  # more than --max-batch (16)
        ({"json": {**good, "stop": ["a", "b", "c", "d", "e"]}}, 400, "invalid_value"),
        ({"json": {**good, "stop": ""}}, 400, "invalid_value"),
        ({"json": {**good, "best_of": 3}}, 400, "unknown_parameter"),
        ({"json": {**good, "prompt": ""}}, 400, "invalid_prompt"),
        ({"json": {**good, "prompt": ["a", "b"]}}, 400, "invalid_prompt"),
        ({"json": {**good, "prompt": 12}}, 400, "invalid_value"),
        ({"content": b"x" * ((1 << 20) + 1)}, 413, "request_too_large"),
        ({"json": {**good, "max_tokens": True}}, 400, "invalid_value"),  # not read as 1
        ({"json": {**good, "max_tokens": 2.0}}, 400, "invalid_value"),
        ({"json": {**good, "stream": "yes"}}, 400, "invalid_value"),
        ({"json": {**good, "prompt": [DOCS[0]], "echo": True}}, 400, "unsupported_parameter"),  # not ignored
        ({"content": b'{"model": "smol", "prompt": "a \\ud800 b"}', "headers": JSON}, 400, "invalid_text"),
        ({"content": b'{"model": "smol", "prompt": "a", "\\udfff": 1}', "headers": JSON}, 400, "invalid_text"),
    ]
    before = _metrics(url)["errors"]
    for kwargs, status, code in cases:
        response = httpx.post(f"{url}/v1/completions", timeout=60, **kwargs)
        assert response.status_code == status, (kwargs.get("json", kwargs.get("content"))[:80], response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], error
    chat = {"model": "smol", "messages": [{"role": "tool", "content": "42"}, {"role": "user", "content": "hi"}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_role"
    chat["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    response = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_messages"
    for refused in ({"top_logprobs": 2}, {"logprobs": 3}):  # top_logprobs needs logprobs: true
        chat = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], **refused}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat).json()["error"]["code"] == "invalid_value"
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": "smol", "messages": []}).status_code == 400
    lone = b'{"model": "smol", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'
    response = httpx.post(f"{url}/v1/chat/completions", content=lone, headers=JSON)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content.0.text"
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/v1/completions").status_code == 405
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.post(f"{url}/v1/completions", json=good, timeout=120).status_code == 200
    errors = _metrics(url)["errors"]
    assert errors["400"] >= before.get("400", 0) + 25 and errors["413"] == before.get("413", 0) + 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_request_whose_client_leaves_stops_decoding_at_the_next_step(server, stream):
    url, _ = server
    before = _metrics(url)
    body = {"model": "smol", "prompt": "Write the numbers from 1 to 500, separated by commas.", "max_tokens": 400, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            assert len([next(events), next(events)]) == 2  # two pieces of the answer, then the client leaves
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
            httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=3))
    left = time.monotonic()
    while _metrics(url)["cancelled"] == before["cancelled"]:
        assert time.monotonic() - left < 120, "the abandoned request was not cancelled"
        time.sleep(0.1)
    after = _metrics(url)
    decoded = after["completion_tokens"] - before["completion_tokens"]
    assert decoded < 100 and after["cancelled"] == before["cancelled"] + 1  # not 400 tokens for nobody
    assert after["running"] == 0 and after["active_bytes"] == 0  # its fork's pages are freed
    quick = {"model": "smol", "prompt": DOCS[0], "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=quick, timeout=120).status_code == 200
    seconds = after["decode_seconds"] - before["decode_seconds"]
    print(f"\nabandoned 400-token request: {decoded} tokens decoded ({seconds:.1f} s), cancelled {time.monotonic() - left:.1f} s after")


def _post_all(url: str, bodies: list[dict]) -> list[dict]:
    """Send ``bodies`` to /v1/completions at once; their JSON replies, in order."""

    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return [r.json() for r in replies]

    return asyncio.run(send())


def test_requests_over_different_documents_decode_in_one_step_and_answer_as_alone(smol, tmp_path):
    model, tokenizer = smol
    tokens = 12
    expected = [kvcompress.generate(model, tokenizer, doc, QUESTIONS[0], METHOD, max_new_tokens=tokens) for doc in DOCS]
    app = create_app(model, tokenizer, METHOD, name="smol", store=tmp_path)
    with _serving(app) as url:
        bodies = [{"model": "smol", "prompt": doc, "question": QUESTIONS[0], "max_tokens": tokens} for doc in DOCS]
        replies = _post_all(url, bodies)
        metrics = _metrics(url)
    assert [r["choices"][0]["text"] for r in replies] == expected
    assert metrics["largest_batch"] >= 2  # rows of different documents in one step (each request is one row)
    assert metrics["prefills"] == len(DOCS) and metrics["active_bytes"] == 0 and metrics["running"] == 0


def test_answers_that_outgrow_the_budget_are_preempted_and_resume_with_the_same_answer(smol, tmp_path):
    """A budget with room for the documents and little more: answers growing past it stop (the newest
    first), wait, and resume by recomputing their own tokens; no request fails, no answer changes."""
    model, tokenizer = smol
    tokens, method = 24, "none"
    docs = DOCS[:2]
    expected = [kvcompress.generate(model, tokenizer, doc, QUESTIONS[1], method, max_new_tokens=tokens) for doc in docs]
    contexts = sum(kvcompress.compress(model, tokenizer, doc, method).nbytes for doc in docs)
    token = model_summary(model)["kv_bytes_per_token"]
    asked = len(tokenizer(asked_part(tokenizer, QUESTIONS[1]), add_special_tokens=False)["input_ids"])
    budget = contexts + 2 * (asked + 32) * token  # both start (a page each); both cannot grow a second page
    app = create_app(model, tokenizer, method, name="smol", memory_budget=budget, store=tmp_path)
    with _serving(app) as url:
        bodies = [{"model": "smol", "prompt": doc, "question": QUESTIONS[1], "max_tokens": tokens} for doc in docs]
        replies = _post_all(url, bodies)
        metrics = _metrics(url)
    assert [r["choices"][0]["text"] for r in replies] == expected
    assert metrics["preemptions"] >= 1 and metrics["active_bytes"] == 0


def test_a_request_cancelled_while_queued_is_never_run_and_its_handler_is_told():
    loop = asyncio.new_event_loop()
    metrics = Metrics()
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))  # all the worker reads before a job runs
    engine = Engine(model, None, "none", None, metrics, max_batch=8, max_queue=4)
    job = Job("key", "a context", "a question", max_tokens=4, prompt_tokens=3, loop=loop, n=2, cancelled=True)
    engine.submit(job)
    engine.jobs.put(None)
    engine._run()  # here, not on its thread: it returns after the queue's end
    try:
        assert loop.run_until_complete(asyncio.wait_for(job.events.get(), 5)) == ("done", ["cancelled"] * 2, [0, 0])
    finally:
        loop.close()
    assert metrics.counts["cancelled"] == 1 and metrics.counts["batches"] == 0


def test_under_load_every_answer_is_the_single_request_answer_and_memory_stays_in_budget(smol, tmp_path):
    """Two documents of ~400 tokens, 200 requests, 8 at a time, under a budget with room for one document
    and the answers of 4 requests: answers over one document decode together; the other document waits,
    goes to disk and comes back; no answer changes."""
    model, tokenizer = smol
    docs = [doc * 12 for doc in DOCS[:2]]
    expected = {}
    for doc in docs:
        cache = kvcompress.compress(model, tokenizer, doc, METHOD, prefill_chunk=512)
        for q in QUESTIONS:
            expected[doc, q] = kvcompress.ask(model, tokenizer, cache, q, max_new_tokens=TOKENS)
    one = cache.nbytes
    asked = max(len(tokenizer(asked_part(tokenizer, q), add_special_tokens=False)["input_ids"]) for q in QUESTIONS)
    answer = (asked + TOKENS) * model_summary(model)["kv_bytes_per_token"]  # a fork, at most
    budget = one + one // 4 + 4 * answer  # not two documents at once
    app = create_app(model, tokenizer, METHOD, name="smol", memory_budget=budget, store=tmp_path, max_batch=4)
    prompts = [(doc, q) for doc in docs for q in QUESTIONS]
    requests, answers, kept = 200, [], []

    async def load(url):
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:

            async def one_request(i):
                doc, q = prompts[i % len(prompts)]
                async with gate:
                    r = await client.post(
                        "/v1/completions", json={"model": "smol", "prompt": doc, "question": q, "max_tokens": TOKENS}
                    )
                    if i % 10 == 0:
                        held = (await client.get("/metrics", params={"format": "json"})).json()
                        kept.append(held["kept_bytes"] + held["active_bytes"])
                assert r.status_code == 200, r.text
                answers.append((doc, q, r.json()["choices"][0]["text"]))

            await asyncio.gather(*(one_request(i) for i in range(requests)))

    start = time.perf_counter()
    with _serving(app) as url:
        asyncio.run(load(url))
        metrics = _metrics(url)
    seconds = time.perf_counter() - start
    assert len(answers) == requests
    wrong = [(doc[:20], q, got, expected[doc, q]) for doc, q, got in answers if got != expected[doc, q]]
    assert not wrong, wrong
    assert max(kept) <= budget and metrics["kept_bytes"] <= budget  # running answers and idle contexts together
    assert metrics["evictions"] > 0 and metrics["disk_hits"] > 0 and metrics["prefills"] == 2  # reloaded, never compressed again
    assert metrics["largest_batch"] > 1 and metrics["batches"] < metrics["completion_tokens"]  # steps decode answers together
    print(
        f"\n{requests} requests, 8 concurrent: {seconds:.1f} s, {metrics['batches']} steps for {metrics['completion_tokens']} "
        f"tokens (at most {metrics['largest_batch']} rows), {metrics['disk_hits']} disk hits"
    )


def test_a_context_reloaded_from_disk_answers_the_same(smol, expected, tmp_path):
    model, tokenizer = smol
    doc, q = DOCS[0], QUESTIONS[0]
    body = {"model": "smol", "prompt": doc, "question": q, "max_tokens": TOKENS}
    app = create_app(model, tokenizer, METHOD, name="smol", store=tmp_path)
    with _serving(app) as url:  # a clean shutdown saves what it kept
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == expected[doc, q]
    assert len(list(tmp_path.glob("*.kvc"))) == 1
    again = create_app(model, tokenizer, METHOD, name="smol", store=tmp_path)
    with _serving(again) as url:
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == expected[doc, q]
        metrics = _metrics(url)
    assert metrics["disk_hits"] == 1 and metrics["prefills"] == 0


def test_the_command_serves_and_saves_its_contexts_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(kvcompress.__file__).parents[1])}
    cmd = [sys.executable, "-m", "kvcompress.cli", "serve", "--method", "kivi:4", "--port", str(port), "--store", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() is not None else "timeout"
            )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.2)
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": DOCS[2]}], "max_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "saved 1 kept context(s)" in out and len(list(tmp_path.glob("*.kvc"))) == 1


def _text_store(folder, budget, disk_budget=None) -> ContextStore:
    """A store of strings, one text file each, of ``len`` bytes in memory."""
    return ContextStore(
        folder, budget, save=lambda c, p: p.write_text(c), load=lambda p: p.read_text(), size=len, disk_budget=disk_budget
    )


def test_the_store_moves_the_least_recently_used_to_disk_and_back(tmp_path):
    store = _text_store(tmp_path, budget=10)
    store.put("a", "aaaa")
    store.put("b", "bbbb")
    assert store.get("a") == ("aaaa", "memory")  # a is now the most recent
    store.put("c", "cccc")  # 12 bytes > 10: b, the least recent, goes to disk
    assert list(store.memory) == ["a", "c"] and set(store.disk) == {"b"} and store.kept_bytes == 8
    assert store.get("b") == ("bbbb", "disk") and store.get("zz") == (None, None)
    store.put("big", "x" * 11)  # larger than the budget: everything goes to disk
    assert store.kept_bytes == 0 and set(store.disk) == {"a", "b", "c", "big"}
    assert parse_size("512MiB") == 512 << 20 and parse_size("2GB") == 2 * 10**9 and parse_size("100") == 100
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12 parsecs")


def test_the_store_deletes_the_least_recently_used_files_beyond_its_budget(tmp_path):
    store = _text_store(tmp_path, budget=0, disk_budget=10)  # nothing stays in memory: every put is a file
    for key in "abc":
        store.put(key, key * 4)  # the third file makes 12 bytes > 10: a's, the least recently used, is deleted
    assert list(store.disk) == ["b", "c"] and store.disk_bytes == 8 and store.deleted == 1
    assert sorted(p.stem for p in tmp_path.glob("*.kvc")) == ["b", "c"]
    assert store.get("a") == (None, None)  # gone: the server compresses it again
    assert store.get("b") == ("bbbb", "disk")  # b is now the most recently used: c goes next
    store.put("d", "dddd")
    assert list(store.disk) == ["b", "d"] and sorted(p.stem for p in tmp_path.glob("*.kvc")) == ["b", "d"]
    store.put("huge", "x" * 11)  # one file over the whole budget: nothing is kept
    assert not store.disk and not list(tmp_path.glob("*.kvc")) and store.deleted == 5
    for key in "ef":
        store.put(key, key * 4)
    again = _text_store(tmp_path, budget=0, disk_budget=5)  # a restart with a smaller budget keeps the newest
    assert list(again.disk) == ["f"] and [p.stem for p in tmp_path.glob("*.kvc")] == ["f"]


def test_serve_help_explains_every_flag_and_a_bad_spec_fails_before_loading(capsys):
    from kvcompress.cli import build_parser, main

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 10 and all(a.help and len(a.help) > 20 for a in flags), [a.dest for a in flags if not a.help]
    assert main(["serve", "--method", "nosuchmethod:1"]) == 2
    assert "nosuchmethod" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--store-budget", "20GiB"]).store_budget == 20 << 30
    assert main(["serve", "--store-budget", "0"]) == 2 and "--store-budget" in capsys.readouterr().err
