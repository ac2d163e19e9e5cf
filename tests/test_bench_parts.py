"""The bench parts beyond speed, on the default model at short lengths: perplexity per text, throughput
under a KV memory budget, chunked prefill's figures; and how speed is measured: decode steps in turns,
the peak memory read from after the warm-up (about a minute together on 2 CPU cores)."""

from __future__ import annotations

import math
import mmap
import os

import pytest
import torch

import kvcompress
from kvcompress.bench import runner, speed
from kvcompress.bench.methods import resolve
from test_method_table import none_bytes

pytestmark = pytest.mark.model

C, DECODE = 64, 8  # short: the harness's own checks (decode steps >= 32) are the CLI's
# SmolLM2-135M in float32: 30 layers, 3 KV heads of dim 64; one token's keys and values in all of them.
TOKEN_BYTES = 2 * 30 * 3 * 64 * 4


@pytest.fixture
def smol_bench(smol, monkeypatch):
    """The harness loads the session's default model instead of loading it again."""
    monkeypatch.setattr(kvcompress, "load_model", lambda *args, **kwargs: smol)


def test_perplexity_is_a_column_per_text_with_finite_ratios(tmp_path, smol_bench):
    """Two texts given by path (short, so tokenizing them is quick; ``kjv`` and ``prose`` load the same way)."""
    paths = []
    for name, line in (("fox", "The quick brown fox jumps over the lazy dog, then rests by the river. "),
                       ("ledger", "Item {i}: seven crates of pears were shipped to the northern harbour. ")):
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(line.format(i=i) for i in range(60)))
        paths.append(str(path))
    config = runner.BenchConfig(methods=("streaming:window=16",), contexts=(64,), threads=2, texts=tuple(paths),
                                ppl_tokens=8, ppl_windows=1)
    result = runner.run(config, tmp_path / "out", only=("perplexity",))
    fox, ledger = (runner.load_text(p).name for p in paths)
    assert result.folder.name.split("_")[3] == f"{fox}+{ledger}"
    for row in result.rows:
        for text in (fox, ledger):
            assert math.isfinite(row[f"ppl[{text}]"]) and math.isfinite(row[f"ppl_delta_pct[{text}]"])
    assert result.rows[0][f"ppl_delta_pct[{ledger}]"] == 0.0
    assert result.rows[1][f"ppl[{fox}]"] != result.rows[1][f"ppl[{ledger}]"]
    header = result.table.splitlines()[0]
    assert f"ppl {fox} (Δ% vs none)" in header and f"ppl {ledger} (Δ% vs none)" in header
    stored = sorted(p.name for p in (result.folder / "parts" / "C64").iterdir())
    assert stored == sorted(f"{s}.perplexity[{t}].json" for s in ("streaming_window=16", "none") for t in (fox, ledger))


def test_throughput_batch_fits_the_budget_and_none_gets_batch_4(smol):
    model, tokenizer = smol
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 60, return_tensors="pt")["input_ids"][:, :C]
    per_sequence, fixed = speed.sequence_nbytes(resolve("none"), model, ids, DECODE)
    assert per_sequence == none_bytes(C + DECODE) and fixed == 0  # whole 32-token pages
    budget = runner.BUDGET_BATCH * per_sequence
    none = speed.throughput(resolve("none"), model, ids, DECODE, budget)
    assert none["batch"] == 4 and none["cache_bytes"] == budget
    window = speed.throughput(resolve("streaming:window=16"), model, ids, DECODE, budget)
    # Sink and window in whole pages, and the masks of evicted slots: about half of none's 3 pages.
    assert none_bytes(4 + 16) <= window["bytes_per_sequence"] < per_sequence
    assert window["batch"] == budget // window["bytes_per_sequence"] > 4
    for found in (none, window):
        assert found["batch"] * found["bytes_per_sequence"] <= found["cache_bytes"] <= budget
        assert found["tokens_per_s"] > 0
    with pytest.raises(speed.MeasurementError, match="raise --memory-budget"):
        speed.throughput(resolve("none"), model, ids, DECODE, per_sequence - 1)


def test_chunked_prefill_reports_its_time_and_peak(smol):
    model, tokenizer = smol
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 60, return_tensors="pt")["input_ids"][:, :C]
    found = speed.measure(resolve("streaming:window=16"), model, ids, DECODE, chunk=16)
    whole = speed.measure(resolve("streaming:window=16"), model, ids, DECODE)
    assert found["prefill_s"] > 0 and found["prefill_peak_memory_bytes"] > 0
    # Later chunks attend to the evicted earlier ones: the same bytes, other tokens kept, so other greedy steps.
    assert found["kv_bytes_after_prefill"] == whole["kv_bytes_after_prefill"]


def test_decode_steps_in_turns_start_a_new_group_when_memory_is_short(smol, monkeypatch):
    """Each row's process decodes a few steps in turn; when free memory would not hold another process,
    the next group starts with a fresh baseline, and every row's ratio is to the baseline of its group."""
    monkeypatch.setattr(speed, "MEMORY_RESERVE", math.inf)  # never room: the baseline and one row per group
    _, tokenizer = smol
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20)["input_ids"][:C]
    base = {"model": runner.DEFAULT_MODEL, "dtype": "float32", "device": "cpu", "threads": 1, "ids": ids,
            "decode_tokens": 6, "prefill_chunk": None}  # 6 steps in turns of 4: the last turn takes 2
    specs = ["none", "streaming:window=16", "kivi:bits=4"]
    found = speed.measure_interleaved([{**base, "spec": spec} for spec in specs], round_steps=4)
    assert [r["decode_group"] for r in found] == [0, 0, 1]
    assert all(len(r["decode_step_ms"]) == 6 and r["tokens_end"] == C + 6 for r in found)
    assert found[0]["baseline_decode_ms"] == found[0]["decode_ms_per_token"] == found[1]["baseline_decode_ms"]
    assert found[2]["baseline_decode_ms"] > 0
    assert found[0]["decode_x_rounds"] == 1.0
    assert found[1]["decode_x_rounds"] == speed.round_ratio(found[1]["decode_step_ms"], found[0]["decode_step_ms"], 4)
    assert all(r["peak_memory_bytes"] >= r["memory_after_load_bytes"] > 0 for r in found)


def test_throughput_batches_decode_in_turns_with_the_baseline(smol):
    """Throughput rows take their decode steps in turns as speed rows do: every row keeps the baseline's
    tokens/s over the same rounds, and its batch still fits the budget."""
    model, tokenizer = smol
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20)["input_ids"][:C]
    budget = runner.BUDGET_BATCH * speed.sequence_nbytes(resolve("none"), model, torch.tensor([ids]), 6)[0]
    base = {"model": runner.DEFAULT_MODEL, "dtype": "float32", "device": "cpu", "threads": 1, "ids": ids,
            "decode_tokens": 6, "prefill_chunk": None, "part": "throughput", "budget": budget}
    found = speed.measure_interleaved([{**base, "spec": spec} for spec in ("none", "streaming:window=16")], round_steps=4)
    assert [r["batch"] for r in found][0] == 4 and found[1]["batch"] > 4
    assert found[0]["baseline_tokens_per_s"] == found[0]["tokens_per_s"] == found[1]["baseline_tokens_per_s"] > 0
    assert all(r["decode_tokens"] == 6 and r["cache_bytes"] <= budget for r in found)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the CPU peak resets through Linux's /proc/self/clear_refs")
def test_the_cpu_peak_starts_over_after_a_reset():
    """The prefill's peak is read from after the warm-up: memory held and freed before a reset does not count."""
    cpu, size = torch.device("cpu"), 64 << 20

    def resident() -> mmap.mmap:
        """64 MiB of fresh pages, touched so they are resident. Mapped apart from the allocator: a block
        from malloc could reuse memory an earlier test freed but the process still holds (no new peak)."""
        region = mmap.mmap(-1, size)
        for page in range(0, size, mmap.PAGESIZE):
            region[page] = 1
        return region

    speed._reset_peak(cpu)  # else an earlier test's higher peak could stand in for this one
    block = resident()
    held = speed._peak_memory(cpu)
    block.close()  # unmapped: the pages leave the process
    speed._reset_peak(cpu)
    after = speed._peak_memory(cpu)
    assert held - after > size * 0.9
    block = resident()
    assert speed._peak_memory(cpu) - after > size * 0.9
    block.close()
