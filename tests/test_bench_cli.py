"""``kvcompress bench`` refuses bad input with one line and exit code 2, before measuring anything."""

from __future__ import annotations

import builtins

import pytest

from kvcompress.bench import kvpress_adapter
from kvcompress.cli import main


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

    monkeypatch.setattr(runner, "measure_in_subprocess", refuse)
    monkeypatch.setattr(runner, "perplexity", refuse)
    monkeypatch.setattr(runner, "run_retrieval", refuse)


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
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, no_measuring, argv, message):
    code, out, err = _run(capsys, "--out", str(tmp_path), *argv)
    assert code == 2
    assert err.startswith("kvcompress: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


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


@pytest.mark.model
def test_parts_limits_what_is_measured(tmp_path, monkeypatch, no_measuring):
    """``--parts speed`` measures speed only (of the method and of the baseline it is compared with)."""
    from kvcompress.bench import runner

    measured = []

    def fake_speed(request):
        measured.append(request["spec"])
        return {"prefill_s": 1.0, "decode_ms_per_token": 2.0, "context_tokens": 64, "kv_bytes_after_prefill": 640,
                "peak_memory_bytes": 1, "memory_after_load_bytes": 1, "memory_kind": "rss"}

    monkeypatch.setattr(runner, "measure_in_subprocess", fake_speed)  # perplexity and retrieval still refuse
    config = runner.BenchConfig(methods=("kivi:bits=4",), contexts=(64,), threads=1)
    result = runner.run(config, tmp_path, only=("speed",))
    assert measured == ["none", "kivi:bits=4"]
    assert [("perplexity" in row, "decode_ms_per_token" in row) for row in result.rows] == [(False, True)] * 2
