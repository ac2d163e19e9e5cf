"""``kvcompress bench`` refuses bad input with one line and exit code 2, before measuring anything."""

from __future__ import annotations

import builtins
import json
import os

import pytest

import kvcompress
from kvcompress.bench import kvpress_adapter, runner
from kvcompress.bench.cli import config_from_args, run_from_args
from kvcompress.cli import UsageError, build_parser, main


def _run(capsys, *argv):
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_measuring(monkeypatch):
    """Fail the test if a bad argument got as far as measuring."""
    from kvcompress.bench import runner

    def refuse(*args, **kwargs):
        raise AssertionError("measured despite bad input")

    monkeypatch.setattr(runner, "measure_interleaved", refuse)
    monkeypatch.setattr(runner, "perplexity", refuse)
    monkeypatch.setattr(runner, "run_retrieval", refuse)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model despite bad input")

    monkeypatch.setattr(runner._Inputs, "model", refuse)


@pytest.fixture
def smol_bench(smol, monkeypatch):
    """The harness loads the session's default model instead of loading it again."""
    monkeypatch.setattr(kvcompress, "load_model", lambda *args, **kwargs: smol)


def _one_line(err: str, *fragments: str) -> bool:
    return err.startswith("kvcompress: error: ") and err.count("\n") == 1 and all(f in err for f in fragments)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "none,snapkvv"], "unknown method 'snapkvv'"),
        (["--methods", "kivi:bits=3"], "bits must be 2, 4 or 8"),
        (["--methods", ","], "--methods is empty"),
        (["--contexts", "abc"], "--contexts takes comma-separated positive token counts"),
        (["--parts", "speed,latency"], "--parts takes a comma-separated subset of speed, perplexity, retrieval"),
        (["--contexts", "1024,0"], "--contexts takes comma-separated positive token counts"),
        (["--contexts", "1024,"], "--contexts takes comma-separated positive token counts"),
        (["--decode-tokens", "8"], "--decode-tokens must be at least 32"),
        (["--cases", "0"], "--cases must be at least 1"),
        (["--text", "/nonexistent/book.txt"], "neither prose nor code nor kjv nor an existing file"),
        (["--retrieval-tasks", "rular"], "unknown retrieval task set 'rular'; sets: default, ruler"),
        (["--retrieval-tasks", "ruler", "--cases", "30"], "--cases 30: --retrieval-tasks ruler takes a multiple of 8"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, no_measuring, argv, message):
    code, out, err = _run(capsys, "--out", str(tmp_path), *argv)
    assert code == 2
    assert err.startswith("kvcompress: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _config(*argv):
    return config_from_args(build_parser().parse_args(["bench", *argv]), UsageError)


def test_ruler_cases_default_to_whole_rounds_of_32_and_quick_keeps_the_default_set():
    assert (_config().tasks, _config().cases) == ("default", 9)
    assert (_config("--retrieval-tasks", "ruler").cases, _config("--retrieval-tasks", "ruler", "--cases", "16").cases) == (32, 16)
    assert (_config("--quick").tasks, _config("--quick").cases) == ("default", 3)


def test_texts_retrieval_cases_chunk_and_budget_reach_the_config():
    assert (_config().texts, _config().ppl_tokens, _config().ppl_windows) == (("prose", "kjv"), 256, 4)
    assert _config("--quick").texts == ("prose",) and _config("--text", "code").texts == ("code",)
    config = _config("--texts", "prose, kjv,code", "--retrieval-tasks", "ruler", "--retrieval-cases", "40",
                     "--prefill-chunk", "128", "--memory-budget", "1000000")
    assert (config.texts, config.cases, config.prefill_chunk, config.memory_budget) == (("prose", "kjv", "code"), 40, 128, 10**6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
        (["--memory-budget", "-5"], "--memory-budget must be at least 1"),
        (["--texts", ","], "--texts is empty"),
        (["--retrieval-cases", "0"], "--retrieval-cases/--cases must be at least 1"),
        (["--parts", "throughput,speedy"], "--parts takes a comma-separated subset of speed, perplexity, retrieval, throughput"),
    ],
)
def test_bad_new_options_are_one_line(capsys, tmp_path, no_measuring, argv, message):
    code, _, err = _run(capsys, "--out", str(tmp_path), *argv)
    assert code == 2 and _one_line(err, message)


def test_context_longer_than_the_model_accepts(capsys, tmp_path, no_measuring):
    code, _, err = _run(capsys, "--out", str(tmp_path), "--methods", "none", "--contexts", "8190")
    last = err.splitlines()[-1]  # after transformers' own weight-loading bar
    assert code == 2 and last.startswith("kvcompress: error: ") and "positions but smollm2-135m has 8192" in last
    assert "Traceback" not in err


def test_kvpress_missing_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(kvpress_adapter, "_installed_version", lambda dist: None if dist == "kvpress" else "5.24.0")
    code, _, err = _run(capsys, "--out", str(tmp_path), "--methods", "none,kvpress:SnapKVPress:0.5")
    assert code == 2 and "not installed: pip install kvpress" in err and err.count("\n") == 1


def test_plot_without_matplotlib_names_the_pip_command(capsys, tmp_path, monkeypatch, no_measuring):
    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    code, _, err = _run(capsys, "--out", str(tmp_path), "--plot")
    assert code == 2 and "pip install 'kvcompress[bench]'" in err and err.count("\n") == 1


def test_out_that_cannot_be_written(capsys, tmp_path, no_model, no_measuring):
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file, not a folder")
    code, _, err = _run(capsys, "--out", str(in_the_way), "--methods", "none")
    assert code == 2 and _one_line(err, f"cannot write the results into {in_the_way}", "pass --out a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs permissions that apply (not root)")
def test_out_in_a_read_only_folder(capsys, tmp_path, no_model, no_measuring):
    tmp_path.chmod(0o555)
    try:
        code, _, err = _run(capsys, "--out", str(tmp_path / "results"), "--methods", "none")
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and _one_line(err, "cannot write the results into", "Permission denied")


def test_a_truncated_stored_part_names_the_file_and_the_fix(capsys, tmp_path, no_model, no_measuring):
    argv = ["--out", str(tmp_path), "--methods", "none", "--contexts", "64", "--threads", "1", "--texts", "prose"]
    config = config_from_args(build_parser().parse_args(["bench", *argv]), UsageError)
    path = runner.PartStore(tmp_path / config.folder_name("prose"), {}).path("none", 64, "perplexity")
    path.parent.mkdir(parents=True)
    path.write_text('{"spec": "none", "context": 64, "data": {"perpl')
    code, _, err = _run(capsys, *argv)
    assert code == 2 and _one_line(err, str(path), "truncated or corrupt", "delete it", "--force")


@pytest.mark.model
@pytest.mark.parametrize(
    "spec, message",
    [
        ("kivi:bits=4,group=7", "group=7 must divide the model's head dim 64"),
        ("lowrank:calibration=/nonexistent.safetensors", "'/nonexistent.safetensors' does not exist"),
    ],
)
def test_a_method_the_model_cannot_take_fails_before_measuring(capsys, tmp_path, smol_bench, no_measuring, spec, message):
    code, _, err = _run(capsys, "--out", str(tmp_path), "--methods", f"none,{spec}", "--contexts", "64", "--texts", "prose")
    assert code == 2 and _one_line(err, message)


def _fake_part(part: str) -> dict:
    if part == "speed":
        return {"prefill_s": 1.0, "decode_ms_per_token": 2.0, "context_tokens": 64, "kv_bytes_after_prefill": 640,
                "peak_memory_bytes": 1, "memory_after_load_bytes": 1, "memory_kind": "rss"}
    if part == "perplexity":
        return {"perplexity": 10.0}
    return {"correct": 1, "cases": 1, "by_task": {"passkey": [1, 1]}}


@pytest.mark.model
def test_ctrl_c_keeps_the_finished_parts_and_propagates(tmp_path, smol_bench, monkeypatch):
    """An interrupt ends the run with KeyboardInterrupt (not a usage error); the parts finished before
    it are stored whole, and the next run measures only the others."""
    measured = []

    def measure(part, method, context, config, inputs):
        if len(measured) == 3:
            raise KeyboardInterrupt
        measured.append((method.spec, part))
        return _fake_part(part)

    def speeds_in_turns(requests):  # every row's speed at C in one call (speed.measure_interleaved)
        measured.extend((r["spec"], "speed") for r in requests)
        return [_fake_part("speed") for _ in requests]

    monkeypatch.setattr(runner, "_measure", measure)
    monkeypatch.setattr(runner, "measure_interleaved", speeds_in_turns)
    argv = ["bench", "--out", str(tmp_path), "--methods", "none,kivi:bits=4", "--contexts", "64", "--texts", "prose"]
    args = build_parser().parse_args(argv)
    with pytest.raises(KeyboardInterrupt):
        run_from_args(args, UsageError)
    (folder,) = tmp_path.iterdir()
    stored = sorted(p.name for p in (folder / "parts" / "C64").iterdir())
    assert stored == ["kivi_bits=4.speed.json", "none.perplexity.json", "none.speed.json"]
    assert all(json.loads(p.read_text())["data"] for p in (folder / "parts" / "C64").iterdir())
    measured.clear()
    monkeypatch.setattr(runner, "_measure", lambda part, method, *rest: measured.append((method.spec, part)) or _fake_part(part))
    run_from_args(args, UsageError)
    assert measured == [("none", "retrieval"), ("kivi:bits=4", "perplexity"), ("kivi:bits=4", "retrieval")]


@pytest.mark.model
def test_parts_limits_what_is_measured(tmp_path, monkeypatch, no_measuring):
    """``--parts speed`` measures speed only (of the method and of the baseline it is compared with)."""
    from kvcompress.bench import runner

    measured = []

    def fake_speed(request):
        measured.append(request["spec"])
        return {"prefill_s": 1.0, "decode_ms_per_token": 2.0, "context_tokens": 64, "kv_bytes_after_prefill": 640,
                "peak_memory_bytes": 1, "memory_after_load_bytes": 1, "memory_kind": "rss"}

    monkeypatch.setattr(runner, "measure_interleaved", lambda requests: [fake_speed(r) for r in requests])  # the others refuse
    config = runner.BenchConfig(methods=("kivi:bits=4",), contexts=(64,), threads=1, texts=("prose",))
    result = runner.run(config, tmp_path, only=("speed",))
    assert measured == ["none", "kivi:bits=4"]
    assert [("perplexity" in row, "decode_ms_per_token" in row) for row in result.rows] == [(False, True)] * 2
