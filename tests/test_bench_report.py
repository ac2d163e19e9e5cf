"""Bookkeeping of the harness, without a model: rows and ratios, table, CSV/JSON, reuse unless --force."""

from __future__ import annotations

import csv
import json

import pytest

from kvcompress.bench import report, runner
from kvcompress.bench.runner import BenchConfig, PartStore, plan

CONDITIONS = {"model": "m", "dtype": "float32", "device": "cpu", "threads": 2, "batch": 1, "ppl_tokens": 8}


def _speed(kv_per_token, prefill_s, decode_ms, peak, context=1024):
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": decode_ms,
        "context_tokens": context,
        "kv_bytes_after_prefill": kv_per_token * context,
        "peak_memory_bytes": peak,
        "memory_after_load_bytes": 100,
        "memory_kind": "rss",
    }


def _result(spec, context, kv, ppl, correct, source="kvcompress"):
    return {
        "spec": spec,
        "source": source,
        "context": context,
        "speed": _speed(kv, 2.0 if spec == "none" else 3.0, 10.0 if spec == "none" else 5.0, 2**30, context),
        "perplexity": {"perplexity": ppl},
        "retrieval": {"correct": correct, "cases": 3, "by_form": {"passkey": [1, 1], "kv": [correct - 1, 2]}},
    }


RESULTS = [
    _result("none", 1024, 1000, 10.0, 3),
    _result("kivi:bits=2", 1024, 250, 11.0, 2),
    _result("kvpress:SnapKVPress:0.5", 1024, 500, 12.0, 1, source="kvpress"),
    _result("none", 4096, 1000, 9.0, 3),
    _result("kivi:bits=2", 4096, 200, 9.9, 1),
]


def test_rows_hold_ratios_to_none_at_the_same_length():
    rows = report.build_rows(RESULTS, CONDITIONS)
    assert [(r["method"], r["context"]) for r in rows] == [(r["spec"], r["context"]) for r in RESULTS]
    kivi_1k, kivi_4k = rows[1], rows[4]
    assert kivi_1k["compression"] == pytest.approx(4.0) and kivi_4k["compression"] == pytest.approx(5.0)
    assert kivi_1k["perplexity_delta_pct"] == pytest.approx(10.0) and kivi_4k["perplexity_delta_pct"] == pytest.approx(10.0)
    assert kivi_1k["decode_x"] == pytest.approx(0.5) and kivi_1k["prefill_x"] == pytest.approx(1.5)
    assert kivi_1k["retrieval_acc"] == pytest.approx(2 / 3) and kivi_1k["retrieval_acc_kv"] == pytest.approx(0.5)
    assert rows[0]["compression"] == 1.0 and rows[0]["perplexity_delta_pct"] == 0.0
    assert all(r[k] == v for r in rows for k, v in CONDITIONS.items())


def test_table_has_every_row_and_marks_kvpress():
    rows = report.build_rows(RESULTS, CONDITIONS)
    table = report.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "method" and "perplexity (Δ% vs none)" in lines[0]
    body = [line for line in lines[2:] if " | " in line]
    assert len(body) == len(RESULTS)
    assert "kvpress:SnapKVPress:0.5 †" in table and "† compressed by NVIDIA kvpress" in table
    assert "4.00×" in body[1] and "11.000 (+10.0%)" in body[1] and "67% (2/3)" in body[1]
    per_form = report.format_retrieval(rows, ("passkey", "kv", "two-part"))
    assert len(per_form.splitlines()) == 2 + len(RESULTS) and "n/a" in per_form  # no two-part cases here


def test_csv_and_json_hold_rows_and_conditions(tmp_path):
    rows = report.build_rows(RESULTS, CONDITIONS)
    paths = report.write_outputs(tmp_path, rows, RESULTS, CONDITIONS, "TABLE")
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["context"]) for r in table] == [(r["spec"], str(r["context"])) for r in RESULTS]
    assert {"model", "dtype", "device", "threads", "batch", "ppl_tokens", "compression", "decode_x"} <= set(table[0])
    payload = json.loads(paths["json"].read_text())
    assert payload["conditions"] == CONDITIONS and len(payload["rows"]) == len(RESULTS)
    assert payload["raw"][1]["speed"]["kv_bytes_after_prefill"] == 250 * 1024
    assert paths["table"].read_text() == "TABLE\n"


def test_folder_is_named_after_the_conditions():
    config = BenchConfig(methods=("none",), contexts=(1024,), model="smollm2-135m", device="cpu", threads=2)
    name = config.folder_name("prose")
    assert name == "smollm2-135m_float32_cpu-2t_prose_ppl64x3_ret9-seed0_dec32"
    other = BenchConfig(methods=("none",), contexts=(1024,), device="cpu", threads=2, seed=1).folder_name("prose")
    assert other != name


def test_folder_is_unique_per_model(tmp_path, monkeypatch):
    """Two checkpoints named alike, or two hub models of different owners, never share results."""
    (tmp_path / "m1" / "ckpt").mkdir(parents=True)
    (tmp_path / "m2" / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    first, second = runner.model_folder_name("m1/ckpt"), runner.model_folder_name("m2/ckpt")
    assert first.startswith("ckpt-") and second.startswith("ckpt-") and first != second
    assert runner.model_folder_name(str(tmp_path / "m1" / "ckpt")) == first  # the path, not how it was typed
    assert runner.model_folder_name("orgA/llama") == "orgA--llama" != runner.model_folder_name("orgB/llama")
    assert runner.model_folder_name("smollm2-135m") == "smollm2-135m"


def _fill(store, specs, contexts, parts=runner.PARTS):
    for spec in specs:
        for context in contexts:
            for part in parts:
                store.save(spec, context, part, {"part": part}, {})


def test_plan_reuses_stored_parts_unless_forced(tmp_path):
    store = PartStore(tmp_path)
    specs = ["none", "kivi:bits=2", "streaming:window=512"]
    _fill(store, specs, [1024])
    assert all(parts == [] for parts in plan(store, specs, (1024,), force=False).values())
    assert all(parts == list(runner.PARTS) for parts in plan(store, specs, (1024,), force=True).values())
    todo = plan(store, [*specs, "kivi:bits=4"], (1024, 2048), force=False)
    assert todo["kivi:bits=4", 1024] == list(runner.PARTS) and todo["kivi:bits=2", 2048] == list(runner.PARTS)
    # A new method's speed at 1024 is measured, so the baseline's speed at 1024 is measured again.
    assert todo["none", 1024] == ["speed"] and todo["kivi:bits=2", 1024] == []


def test_store_ignores_a_file_of_another_spec(tmp_path):
    store = PartStore(tmp_path)
    store.save("a:b", 64, "speed", {"x": 1}, {})
    assert store.load("a:b", 64, "speed") == {"x": 1}
    store.path("a_b", 64, "speed").write_text(json.dumps({"spec": "a?b", "data": {"x": 2}}))  # same slug
    assert store.load("a_b", 64, "speed") is None


def test_run_reuses_everything_without_loading_the_model(tmp_path, monkeypatch):
    config = BenchConfig(methods=("none", "kivi:bits=2"), contexts=(1024, 4096), device="cpu", threads=2)
    folder = tmp_path / config.folder_name("prose")
    store = PartStore(folder)
    for r in RESULTS:
        if r["source"] == "kvcompress":
            for part in runner.PARTS:
                store.save(r["spec"], r["context"], part, r[part], {})

    def no_model(*args, **kwargs):
        raise AssertionError("nothing should be measured")

    monkeypatch.setattr(runner._Inputs, "model", no_model)
    monkeypatch.setattr(runner, "measure_in_subprocess", no_model)
    result = runner.run(config, tmp_path)
    assert result.folder == folder
    assert [(r["method"], r["context"]) for r in result.rows] == [
        ("none", 1024), ("kivi:bits=2", 1024), ("none", 4096), ("kivi:bits=2", 4096)
    ]
    assert result.rows[1]["compression"] == pytest.approx(4.0)
    assert "model smollm2-135m, float32, cpu, threads 2, batch 1" in result.header
    assert {"json", "csv", "table"} <= set(result.paths) and all(p.is_file() for p in result.paths.values())
    with pytest.raises(AssertionError, match="nothing should be measured"):
        runner.run(config, tmp_path, force=True)


def test_question_aware_row_measures_retrieval_only(tmp_path):
    from kvcompress.bench.methods import resolve

    method = resolve("snapkv:ratio=0.75@question-aware")
    assert method.question_aware and method.parts == ("retrieval",)
    assert method.cache_spec == "snapkv:ratio=0.75"
    assert not resolve("snapkv:ratio=0.75").question_aware
    store = PartStore(tmp_path)
    specs = ["none", "snapkv:ratio=0.75@question-aware"]
    todo = plan(store, specs, (1024,), force=True, parts={s: resolve(s).parts for s in specs})
    assert todo["snapkv:ratio=0.75@question-aware", 1024] == ["retrieval"]
    assert todo["none", 1024] == list(runner.PARTS)
    with pytest.raises(Exception, match="unknown method"):
        resolve("nosuch:ratio=0.5@question-aware")
