"""A conversation's later turns on ``kvcompress serve``: time to first token when the earlier turn's context is
kept (the server continues it, prefilling only the new tokens) against the same turn with nothing kept.

For each method, starts the real ``kvcompress serve`` on a local port. Two users each hold a conversation
over their own document (``--tokens`` tokens of the King James Bible, as the system message, a number
planted in it):

- **kept**: the first user asks ``--turns`` questions in turn, each request carrying the whole conversation so
  far (system, earlier questions and the assistant's answers), as chat clients send it;
- **cold**: the second user sends only the last turn's conversation (the same shape, their own document), so
  the server holds nothing of it and compresses it whole.

Prints, per method, each kept turn's time to first token (streamed), the cold last turn's, their ratio, the
tokens the server reused (``/metrics``: ``prefix_hits``, ``reused_tokens``) and whether each answer names the
planted number when asked for it.

    python experiments/serve_turns.py --methods "none;kivi:bits=4;snapkv:ratio=0.75" --tokens 4096

Needs the ``serve`` and ``bench`` extras.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import _documents, _free_port, wait_healthy  # noqa: E402

from kvcompress.models import load_model  # noqa: E402


def _ask(url: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """Stream one chat answer: (seconds to its first piece, its text)."""
    body = {"model": "smol", "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    start, first, pieces = time.perf_counter(), None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line.strip() != "data: [DONE]":
                piece = (json.loads(line[6:])["choices"][0].get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - start
                    pieces.append(piece)
    return first or float("nan"), "".join(pieces)


def run_one(method: str, docs, args) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "kvcompress.cli", "serve", "--method", method, "--port", str(port), "--name", "smol",
           "--memory-budget", args.memory_budget, "--log-level", "warning"]
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 300, cmd)
        row = {"method": method, "kept": [], "answers": []}
        text, questions, expected = docs[0]
        messages = [{"role": "system", "content": text}]
        for question in questions[: args.turns]:
            messages.append({"role": "user", "content": question})
            seconds, answer = _ask(url, messages, args.max_tokens)
            row["kept"].append(seconds)
            row["answers"].append(answer)
            messages.append({"role": "assistant", "content": answer})
        metrics = httpx.get(f"{url}/metrics", params={"format": "json"}).json()
        row["prefix_hits"], row["reused_tokens"] = metrics["prefix_hits"], metrics["reused_tokens"]
        # The other user's last turn, with the same questions and answers after their own document: nothing kept.
        cold = [{"role": "system", "content": docs[1][0]}, *messages[1:-1]]
        row["cold"], row["cold_answer"] = _ask(url, cold, args.max_tokens)
        row["found"] = [number in answer for number, answer in zip(expected, row["answers"]) if number]
        return row
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none;kivi:bits=4", help="method specs separated by semicolons")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each user's document")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--memory-budget", default="2GiB")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()
    _, tokenizer = load_model(device="cpu")
    docs = _documents(tokenizer, 2, args.tokens)
    rows = []
    print(f"# {' '.join(sys.argv)}")
    print("| method | kept turns' TTFT (s) | cold last turn TTFT (s) | last turn kept / cold | prefix hits | tokens reused | number found |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(";"):
        row = run_one(method, docs, args)
        rows.append(row)
        kept = " / ".join(f"{t:.2f}" for t in row["kept"])
        print(f"| {method} | {kept} | {row['cold']:.2f} | {row['kept'][-1] / row['cold']:.3f} | {row['prefix_hits']} | "
              f"{row['reused_tokens']} | {sum(row['found'])}/{len(row['found'])} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
