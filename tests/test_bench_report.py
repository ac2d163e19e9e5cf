"""Bookkeeping of the harness, without a model: rows and ratios, table, CSV/JSON, reuse unless --force."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kvcompress.bench import report, runner, speed
from kvcompress.bench.methods import resolve
from kvcompress.bench.runner import BenchConfig, PartStore, plan

CONDITIONS = {"model": "m", "dtype": "float32", "device": "cpu", "threads": 2, "batch": 1, "ppl_tokens": 8}
FINGERPRINT = {"kvcompress_source": "0123456789abcdef", "torch": "2.13.0", "transformers": "5.24.0", "python": "3.11.7"}


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
        "retrieval": {"correct": correct, "cases": 3, "by_task": {"passkey": [1, 1], "kv": [correct - 1, 2]}},
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


def test_a_ratio_over_rounds_is_not_moved_by_one_stalled_step():
    """Each round compares a row's steps with the baseline's taken just before: the median over rounds
    reads 0.5 where a stall in one step takes the ratio of mean steps past 1."""
    baseline = [10.0] * 16
    row = [5.0] * 16
    row[0] = 500.0  # one stall, in the first round
    assert speed.round_ratio(row, baseline, 4) == pytest.approx(0.5)
    assert sum(row) / sum(baseline) > 3
    rounds = speed.round_ratio([5.0, 5.0, 5.0, 5.0, 6.0, 6.0], [10.0, 10.0, 10.0, 10.0, 4.0, 4.0], 4)
    assert rounds == pytest.approx((0.5 + 1.5) / 2)  # the last round takes the 2 steps left
    with pytest.raises(ValueError, match="same steps"):
        speed.round_ratio([1.0, 2.0], [1.0], 4)


def test_a_row_measured_in_turns_reads_its_ratio_over_rounds():
    """A row measured in turns carries its ratio over the rounds (speed.round_ratio): that is its decode
    ratio, not the ratio of mean steps, which one stalled step moves; a row without it keeps the latter."""
    stalled = {**RESULTS[1], "speed": {**RESULTS[1]["speed"], "decode_ms_per_token": 30.0, "decode_x_rounds": 0.55}}
    rows = report.build_rows([RESULTS[0], stalled, RESULTS[2]], CONDITIONS)
    assert rows[1]["decode_x"] == pytest.approx(0.55) and rows[1]["decode_ms_per_token"] == 30.0
    assert rows[2]["decode_x"] == pytest.approx(0.5)


def test_table_has_every_row_and_marks_kvpress():
    rows = report.build_rows(RESULTS, CONDITIONS)
    table = report.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "method" and "ppl text (Δ% vs none)" in lines[0]
    body = [line for line in lines[2:] if " | " in line]
    assert len(body) == len(RESULTS)
    assert "kvpress:SnapKVPress:0.5 †" in table and "† compressed by NVIDIA kvpress" in table
    assert "4.00×" in body[1] and "11.000 (+10.0%)" in body[1] and "67% (2/3)" in body[1]
    per_form = report.format_retrieval(rows, ("passkey", "kv", "two-part"))
    assert len(per_form.splitlines()) == 3 + len(RESULTS) and "n/a" in per_form  # no two-part cases here
    kivi = per_form.splitlines()[3].split(" | ")  # the baseline's accuracy beside each figure, and the difference
    assert [c.strip() for c in kivi[2:]] == ["100% [100%]", "50% [100%]", "n/a [n/a]", "67% [100%]", "3", "-33"]


def test_a_column_per_perplexity_text_with_its_ratio_to_none():
    def result(spec, prose, kjv):
        return {"spec": spec, "source": "kvcompress", "context": 64,
                "perplexity[prose]": {"perplexity": prose}, "perplexity[kjv]": {"perplexity": kjv}}

    rows = report.build_rows([result("none", 10.0, 20.0), result("kivi:bits=2", 11.0, 30.0)], CONDITIONS)
    assert rows[1]["ppl_delta_pct[prose]"] == pytest.approx(10.0) and rows[1]["ppl_delta_pct[kjv]"] == pytest.approx(50.0)
    assert rows[1]["perplexity_delta_pct"] == pytest.approx(30.0) and "perplexity" not in rows[1]  # the mean, for the plot
    header, _, none, kivi = report.format_table(rows).splitlines()
    assert "ppl prose (Δ% vs none)" in header and "ppl kjv (Δ% vs none)" in header
    assert "11.000 (+10.0%)" in kivi and "30.000 (+50.0%)" in kivi and "20.000 (+0.0%)" in none


def test_without_speed_compression_comes_from_the_bytes_perplexity_held():
    def result(spec, prose_bytes, kjv_bytes):
        return {"spec": spec, "source": "kvcompress", "context": 64,
                "perplexity[prose]": {"perplexity": 10.0, "kv_bytes_after_context": prose_bytes, "context_tokens": 64},
                "perplexity[kjv]": {"perplexity": 20.0, "kv_bytes_after_context": kjv_bytes, "context_tokens": 64}}

    old = {"spec": "h2o", "source": "kvcompress", "context": 64, "perplexity[prose]": {"perplexity": 11.0}}  # stored before bytes were
    rows = report.build_rows([result("none", [6400, 6400], [6400]), result("snapkv", [1600, 1700], [1500]), old], CONDITIONS)
    assert rows[0]["compression"] == 1.0 and rows[0]["kv_bytes_per_token"] == 100.0
    assert rows[1]["kv_bytes_per_token"] == pytest.approx((1650 / 64 + 1500 / 64) / 2)  # windows, then texts
    assert rows[1]["compression"] == pytest.approx(100 / rows[1]["kv_bytes_per_token"])
    assert "compression" not in rows[2] and "kv_bytes_per_token" not in rows[2]
    with_speed = report.build_rows([{**result("none", [64], [64]), "speed": _speed(1000, 2.0, 10.0, 2**30, 64)}], CONDITIONS)
    assert with_speed[0]["kv_bytes_per_token"] == 1000  # the speed part's bytes win
    # none's perplexity stored before it recorded bytes: its speed part's bytes per token serve as the reference
    none_old = {"spec": "none", "source": "kvcompress", "context": 64, "perplexity[prose]": {"perplexity": 10.0},
                "speed": _speed(100, 2.0, 10.0, 2**30, 64)}
    rows = report.build_rows([none_old, result("snapkv", [1600], [1600])], CONDITIONS)
    assert rows[1]["compression"] == pytest.approx(100 / 25)


def test_a_table_without_perplexity_has_one_plain_perplexity_column():
    speed_only = [{k: v for k, v in r.items() if k != "perplexity"} for r in RESULTS[:2]]
    header = report.format_table(report.build_rows(speed_only, CONDITIONS)).splitlines()[0]
    assert "perplexity (Δ% vs none)" in header and "ppl perplexity" not in header


def test_throughput_rows_and_table_compare_tokens_per_second_with_none():
    def result(spec, batch, per_seq, tps):
        thr = {"budget_bytes": 4000, "bytes_per_sequence": per_seq, "batch": batch, "cache_bytes": batch * per_seq,
               "tokens_per_s": tps}
        return {"spec": spec, "source": "kvcompress", "context": 64, "throughput": thr}

    rows = report.build_rows([result("none", 4, 1000, 100.0), result("kivi:bits=2", 16, 250, 300.0)], CONDITIONS)
    assert rows[1]["throughput_batch"] == 16 and rows[1]["throughput_x"] == pytest.approx(3.0)
    table = report.format_throughput(rows)
    assert "300.0 (3.00×)" in table.splitlines()[3] and report.format_throughput(rows[:0]) == ""
    # Measured in turns: the ratio is to none's tokens/s over the same rounds, not to none's own figure.
    in_turns = result("kivi:bits=2", 16, 250, 300.0)
    in_turns["throughput"]["baseline_tokens_per_s"] = 150.0
    rows = report.build_rows([result("none", 4, 1000, 100.0), in_turns], CONDITIONS)
    assert rows[1]["throughput_x"] == pytest.approx(2.0)


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
    # Results measured before the defaults became 256 tokens x 4 windows keep their folder under the old settings.
    config = BenchConfig(methods=("none",), contexts=(1024,), model="smollm2-135m", device="cpu", threads=2,
                         ppl_tokens=64, ppl_windows=3)
    name = config.folder_name("prose")
    assert name == "smollm2-135m_float32_cpu-2t_prose_ppl64x3_ret9-seed0_dec32"
    chunked = BenchConfig(methods=("none",), contexts=(1024,), device="cpu", threads=2, prefill_chunk=256, memory_budget=10**6)
    assert chunked.folder_name("prose+kjv") == "smollm2-135m_float32_cpu-2t_prose+kjv_ppl256x4_ret9-seed0_dec32_chunk256_budget1000000"
    other = BenchConfig(methods=("none",), contexts=(1024,), device="cpu", threads=2, seed=1).folder_name("prose")
    assert other != name
    ruler = BenchConfig(methods=("none",), contexts=(1024,), device="cpu", threads=2, cases=32, tasks="ruler")
    assert ruler.folder_name("prose") == "smollm2-135m_float32_cpu-2t_prose_ppl256x4_ret32-ruler-seed0_dec32"


def test_retrieval_table_shows_every_task_and_the_recall_of_list_answers():
    ruler = {"correct": 5, "cases": 8, "by_task": {"single-number": [1, 1], "multivalue": [0, 1], "vt": [0, 1]},
             "recall_by_task": {"single-number": 1.0, "multivalue": 0.75, "vt": 0.2}}
    results = [{**r, "retrieval": ruler} for r in RESULTS[:2]]
    rows = report.build_rows(results, CONDITIONS)
    assert rows[1]["retrieval_recall_multivalue"] == 0.75 and rows[1]["retrieval_acc_vt"] == 0.0
    table = report.format_retrieval(rows, ("single-number", "multivalue", "vt", "cwe"), ("multivalue", "vt", "cwe"))
    lines = table.splitlines()
    assert lines[0].split(" | ")[-3].strip() == "average" and lines[2].split(" | ")[0].strip() == "none"
    cells = [c.strip() for c in lines[3].split(" | ")]
    assert cells == ["kivi:bits=2", "1024", "100% [100%]", "0% (0.75) [0%]", "0% (0.20) [0%]", "n/a [n/a]", "62% [62%]", "8", "+0"]
    assert lines[-1].startswith("multivalue, vt, cwe: accuracy (mean recall")


def test_a_stale_retrieval_part_counted_by_form_is_still_read():
    """Parts stored before task sets hold ``by_form``; ``--reuse-stale`` shows them."""
    old = {**RESULTS[1], "retrieval": {"correct": 2, "cases": 3, "by_form": {"passkey": [1, 1], "kv": [1, 2]}}}
    assert report.build_rows([old], CONDITIONS)[0]["retrieval_acc_kv"] == 0.5


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


def _store(folder, specs, fingerprint=FINGERPRINT):
    return PartStore(folder, dict.fromkeys(specs, fingerprint))


def _fill(store, specs, contexts, parts=runner.PARTS):
    for spec in specs:
        for context in contexts:
            for part in parts:
                store.save(spec, context, part, {"part": part})


def test_plan_reuses_stored_parts_unless_forced(tmp_path):
    specs = ["none", "kivi:bits=2", "streaming:window=512"]
    store = _store(tmp_path, [*specs, "kivi:bits=4"])
    _fill(store, specs, [1024])
    assert all(parts == [] for parts in plan(store, specs, (1024,), force=False).values())
    assert all(parts == list(runner.PARTS) for parts in plan(store, specs, (1024,), force=True).values())
    todo = plan(store, [*specs, "kivi:bits=4"], (1024, 2048), force=False)
    assert todo["kivi:bits=4", 1024] == list(runner.PARTS) and todo["kivi:bits=2", 2048] == list(runner.PARTS)
    # A new method's speed at 1024 is measured, so every row's speed at 1024 is measured again with it.
    assert todo["none", 1024] == ["speed"] and todo["kivi:bits=2", 1024] == ["speed"]


def test_store_ignores_a_file_of_another_spec(tmp_path):
    store = _store(tmp_path, ["a:b", "a_b"])
    store.save("a:b", 64, "speed", {"x": 1})
    assert store.load("a:b", 64, "speed") == runner.StoredPart({"x": 1}, stale="")
    store.path("a_b", 64, "speed").write_text(json.dumps({"spec": "a?b", "data": {"x": 2}}))  # same slug
    assert store.load("a_b", 64, "speed") is None


def _stored_run(tmp_path, fingerprint=None):
    """A config of none and kivi:bits=2 at 1024 and 4096, whose parts (RESULTS) are stored under
    ``fingerprint`` (default: this code's)."""
    config = BenchConfig(methods=("none", "kivi:bits=2"), contexts=(1024, 4096), device="cpu", threads=2, texts=("prose",))
    folder = tmp_path / config.folder_name("prose")
    store = PartStore(folder, {s: fingerprint or runner.fingerprint(resolve(s)) for s in config.methods})
    for r in RESULTS:
        if r["source"] == "kvcompress":
            for part in runner.PARTS:
                store.save(r["spec"], r["context"], part, r[part])
    return config, folder


def _no_model(*args, **kwargs):
    raise AssertionError("nothing should be measured")


def test_run_reuses_everything_without_loading_the_model(tmp_path, monkeypatch):
    config, folder = _stored_run(tmp_path)
    monkeypatch.setattr(runner._Inputs, "model", _no_model)
    monkeypatch.setattr(runner, "measure_interleaved", _no_model)
    result = runner.run(config, tmp_path)
    assert result.folder == folder
    assert [(r["method"], r["context"]) for r in result.rows] == [
        ("none", 1024), ("kivi:bits=2", 1024), ("none", 4096), ("kivi:bits=2", 4096)
    ]
    assert result.rows[1]["compression"] == pytest.approx(4.0)
    assert "model smollm2-135m, float32, cpu, threads 2, batch 1" in result.header
    assert f"(source {runner.source_hash()})" in result.header and not any(r["stale"] for r in result.rows)
    assert {"json", "csv", "table"} <= set(result.paths) and all(p.is_file() for p in result.paths.values())
    with pytest.raises(AssertionError, match="nothing should be measured"):
        runner.run(config, tmp_path, force=True)


def test_a_part_measured_by_other_code_is_measured_again_unless_reuse_stale(tmp_path):
    specs = ["none", "kivi:bits=2"]
    _fill(_store(tmp_path, specs, {**FINGERPRINT, "torch": "2.12.0"}), specs, [1024])
    store = _store(tmp_path, specs)
    assert store.load("kivi:bits=2", 1024, "speed").stale == "torch 2.12.0 (now 2.13.0)"
    assert all(parts == list(runner.PARTS) for parts in plan(store, specs, (1024,), force=False).values())
    assert all(parts == [] for parts in plan(store, specs, (1024,), force=False, reuse_stale=True).values())
    # A part stored before fingerprints were recorded is stale too.
    store.path("none", 1024, "speed").write_text(json.dumps({"spec": "none", "data": {}, "versions": {}}))
    assert store.load("none", 1024, "speed").stale == "fingerprint not recorded"


def test_reused_stale_rows_are_marked_in_table_csv_and_json(tmp_path, monkeypatch):
    old = {**runner.fingerprint(resolve("none")), "kvcompress_source": "0123456789abcdef"}
    config, folder = _stored_run(tmp_path, old)
    monkeypatch.setattr(runner._Inputs, "model", _no_model)
    monkeypatch.setattr(runner, "measure_interleaved", _no_model)
    result = runner.run(config, tmp_path, reuse_stale=True)
    why = f"kvcompress_source 0123456789abcdef (now {runner.source_hash()})"
    assert [r["stale"] for r in result.rows] == [why] * 4
    body = result.table.splitlines()[2:6]
    assert [line.split(" | ")[0].strip() for line in body] == ["none*", "kivi:bits=2*"] * 2
    assert result.table.splitlines()[-1] == f"* measured by other code: {why}"
    assert result.retrieval_table.splitlines()[2].startswith("none* ")
    with result.paths["csv"].open() as f:
        assert [r["stale"] for r in csv.DictReader(f)] == [why] * 4
    assert json.loads(result.paths["json"].read_text())["rows"][1]["stale"] == why


def test_run_measures_stale_parts_again(tmp_path, monkeypatch):
    config, folder = _stored_run(tmp_path, {**FINGERPRINT, "torch": "2.12.0"})
    measured = []

    def fake_measure(part, method, context, config, inputs):
        measured.append((method.spec, context, part))
        return next(r[part] for r in RESULTS if (r["spec"], r["context"]) == (method.spec, context))

    monkeypatch.setattr(runner._Inputs, "check", lambda self, methods: None)
    monkeypatch.setattr(runner, "_measure", fake_measure)
    monkeypatch.setattr(runner._Inputs, "ids", lambda self, name=None: torch.zeros(4096, dtype=torch.long))
    monkeypatch.setattr(  # speed: every row's at C in one call
        runner, "measure_interleaved", lambda requests: [fake_measure("speed", resolve(r["spec"]), len(r["ids"]), None, None) for r in requests]
    )
    result = runner.run(config, tmp_path)
    assert len(measured) == 2 * 2 * len(runner.PARTS)
    assert not any(r["stale"] for r in result.rows) and "*" not in result.table
    assert json.loads(PartStore(folder, {}).path("none", 1024, "speed").read_text())["fingerprint"] == runner.fingerprint(
        resolve("none")
    )


def test_question_aware_row_measures_retrieval_only(tmp_path):
    method = resolve("snapkv:ratio=0.75@question-aware")
    assert method.question_aware and method.parts == ("retrieval",)
    assert method.cache_spec == "snapkv:ratio=0.75"
    assert not resolve("snapkv:ratio=0.75").question_aware
    specs = ["none", "snapkv:ratio=0.75@question-aware"]
    store = _store(tmp_path, specs)
    todo = plan(store, specs, (1024,), force=True, parts={s: resolve(s).parts for s in specs})
    assert todo["snapkv:ratio=0.75@question-aware", 1024] == ["retrieval"]
    assert todo["none", 1024] == list(runner.PARTS)
    with pytest.raises(Exception, match="unknown method"):
        resolve("nosuch:ratio=0.5@question-aware")
