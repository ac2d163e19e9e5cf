"""``kvcompress bench --quick`` end to end on the default model, at two methods and 512 tokens (about a
minute and a half on one CPU core)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from kvcompress.bench import runner
from kvcompress.bench.cli import QUICK
from kvcompress.bench.retrieval import FORMS
from kvcompress.cli import main
from test_method_table import none_bytes

# SmolLM2-135M in float32: 30 layers, 3 KV heads of dim 64; one token's keys and values in all of them.
LAYERS, KV_HEADS, HEAD_DIM, FLOAT32, FLOAT16 = 30, 3, 64, 4, 2
TOKEN_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * FLOAT32  # 46,080
WEIGHT_BYTES = 134_000_000 * FLOAT32  # at least: 134.5M parameters
METHODS = ["none", "kivi:bits=2"]  # a subset of --quick's methods, at a shorter context
C = 512
ARGS = ["bench", "--quick", "--methods", ",".join(METHODS), "--contexts", str(C)]


def _kivi_bytes(bits: int, group: int = 32, residual: int = 128) -> int:
    """Tokens beyond the residual, a whole group at a time, as packed codes with float16 scales and
    minimums (keys: per channel and group of tokens; values: per token and group of channels), in pages of
    one group, each with two 8-byte addresses per head in the page table (its key and value blocks); the rest in
    full precision."""
    quantized = (C - residual) // group * group  # 384
    codes = 2 * quantized * HEAD_DIM * bits // 8
    key_stats = 2 * (quantized // group) * HEAD_DIM * FLOAT16
    value_stats = 2 * quantized * (HEAD_DIM // group) * FLOAT16
    table = 16 * (quantized // group)
    return LAYERS * KV_HEADS * (codes + key_stats + value_stats + table) + (C - quantized) * TOKEN_BYTES


def _tables(out: str) -> str:
    """The printed header and tables, without the paths that follow them."""
    return out.split("\n\njson: ")[0]


def test_quick_bench_writes_table_csv_json_and_plot_then_reuses(tmp_path, capsys, monkeypatch):
    assert set(METHODS) <= set(QUICK["methods"].split(","))
    assert main([*ARGS, "--plot", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    payload = json.loads((folder / "results.json").read_text())
    rows = payload["rows"]
    with (folder / "results.csv").open() as f:
        assert [(r["method"], r["context"], r["stale"]) for r in csv.DictReader(f)] == [(m, str(C), "") for m in METHODS]
    assert [r["method"] for r in rows] == METHODS
    assert payload["conditions"]["model"] == "smollm2-135m" and payload["conditions"]["batch"] == 1

    # Bytes: exactly what each method holds after the context, per context token.
    expected = {"none": none_bytes(C), "kivi:bits=2": _kivi_bytes(2)}  # none: whole pages and their tables
    for row in rows:
        assert row["kv_bytes"] == expected[row["method"]]
        assert row["compression"] == pytest.approx(expected["none"] / expected[row["method"]])  # relative to none

    # Perplexity of the baseline is a language model's, not a broken cache's (thousands).
    none = rows[0]
    assert 1 < none["perplexity"] < 50 and all(math.isfinite(r["perplexity"]) for r in rows)

    # Retrieval: integer counts over the configured cases, split by task form.
    for raw in payload["raw"]:
        ret = raw["retrieval"]
        assert ret["cases"] == payload["conditions"]["retrieval_cases"] == 3
        assert isinstance(ret["correct"], int) and 0 <= ret["correct"] <= ret["cases"]
        assert set(ret["by_task"]) <= set(FORMS)
        assert [sum(counts) for counts in zip(*ret["by_task"].values())] == [ret["correct"], ret["cases"]]
    assert payload["raw"][0]["retrieval"]["correct"] == 3  # the uncompressed model finds every fact at 512

    # Speed: the configured decode steps; peak memory counts the weights.
    for raw in payload["raw"]:
        assert len(raw["speed"]["decode_step_ms"]) == 32 and raw["speed"]["tokens_end"] == C + 32
    assert all(r["peak_memory_bytes"] > WEIGHT_BYTES for r in rows)
    assert (folder / "frontier.png").stat().st_size > 10_000

    def refuse(*args, **kwargs):
        raise AssertionError("a stored result was measured again")

    monkeypatch.setattr(runner, "measure_interleaved", refuse)
    monkeypatch.setattr(runner, "perplexity", refuse)
    monkeypatch.setattr(runner, "run_retrieval", refuse)
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    assert _tables(capsys.readouterr().out) == _tables(first)
