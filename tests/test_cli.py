"""The command line: answers, the memory summary, and one-line errors (exit 2, no traceback)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kvcompress.cli import UsageError, main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--method", "snapkvv", "--context", "x"], "unknown method 'snapkvv'"),
        (["generate", "--method", "kivi:bits=3", "--context", "x"], "bits must be 2, 4 or 8"),
        (["generate", "--method", "kivi:colour=1", "--context", "x"], "valid parameters: bits=2"),
        (["generate", "--context-file", "/nonexistent/ctx.txt"], "does not exist"),
        (["generate", "--context", "   "], "the context is empty"),
        (["generate", "--context", "x", "--max-new-tokens", "0"], "at least 1"),
        (["info", "--model", "./no-such-model"], "model folder './no-such-model' does not exist"),
        (["generate", "--context", "x", "--model", "smollm2"], "did you mean 'smollm2-135m'"),
        (["generate", "--method", "kivi:residual=1000000000000000", "--context", "x"], "must be at most 16,777,216"),
        (["compress", "--method", "snapkv:budget=1e20", "--context", "x", "--out", "x.kvc"], "'budget' expects int"),
        (["serve", "--port", "99999"], "--port must be between 0 and 65535, got 99999"),
        (["serve", "--port", "-1"], "--port must be between 0 and 65535"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("kvcompress: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_empty_and_non_utf8_files(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    assert "the context is empty" in _run(capsys, "generate", "--context-file", str(empty))[2]
    code, _, err = _run(capsys, "generate", "--context-file", str(latin))
    assert code == 2 and "is not UTF-8" in err


def _one_line_error(code, err, message):
    assert code == 2, err
    assert err.startswith("kvcompress: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_calibration_is_a_usage_error(capsys, monkeypatch, tiny):
    monkeypatch.setattr("kvcompress.cli._load", lambda name: (tiny, None))  # make_cache fails before any tokenizing
    code, _, err = _run(capsys, "generate", "--method", "lowrank:calibration=/nonexistent.safetensors", "--context", "x")
    _one_line_error(code, err, "kvcompress calibrate --out /nonexistent.safetensors")


def test_compress_out_refuses_what_it_would_replace_unasked(capsys, monkeypatch, tmp_path):
    """--out is a new path or, with --force, a regular file; never the context file, a FIFO or a device."""
    def stop(name):
        raise UsageError("the model would load now")

    monkeypatch.setattr("kvcompress.cli._load", stop)
    context = tmp_path / "context.txt"
    context.write_text("The keeper wrote down every ship.")
    old = tmp_path / "old.kvc"
    old.write_bytes(b"an earlier cache")
    fifo = tmp_path / "pipe.kvc"
    os.mkfifo(fifo)
    compress = ["compress", "--context-file", str(context), "--out"]
    for out, force, message in [
        (context, [], "is the context file"),
        (context, ["--force"], "is the context file"),
        (fifo, ["--force"], "is not a regular file"),
        ("/dev/null", ["--force"], "is not a regular file"),
        (old, [], "exists; pass --force to overwrite it"),
        (old, ["--force"], "the model would load now"),  # every check passed
        (tmp_path / "new.kvc", [], "the model would load now"),
    ]:
        code, _, err = _run(capsys, *compress, str(out), *force)
        _one_line_error(code, err, message)
    assert context.read_text() == "The keeper wrote down every ship." and old.read_bytes() == b"an earlier cache"
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["context.txt", "old.kvc", "pipe.kvc"]


@pytest.mark.model
def test_context_longer_than_the_model_limit(capsys, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)  # > 8,192 positions
    code, _, err = _run(capsys, "generate", "--context-file", str(long))
    assert code == 2 and "at most 8192" in err and "shorten the context" in err


@pytest.mark.model
def test_info_reports_shape_and_bytes_per_token(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0
    fields = dict(line.strip().split(": ", 1) for line in out.splitlines())
    assert fields["layers"] == "30" and fields["kv_heads"] == "3" and fields["head_dim"] == "64"
    assert fields["kv_bytes_per_token"] == "46080"  # 2 * 30 * 3 * 64 * 4 bytes


@pytest.mark.model
def test_generate_answers_and_reports_memory(capsys):
    context = "The meeting is on Tuesday. The room is 4B. Bring the blue folder."
    code, out, err = _run(
        capsys, "generate", "--method", "kivi:bits=4,residual=8", "--context", context,
        "--question", "Which room is the meeting in?", "--max-new-tokens", "12",
    )
    assert code == 0
    assert "4B" in out
    assert "kivi:bits=4,residual=8: KV cache holds" in err and "x smaller" in err


@pytest.fixture
def smol_cli(monkeypatch, smol):
    """The CLI loads the session's model instead of loading its own."""
    monkeypatch.setattr("kvcompress.cli._load", lambda name: smol)
    return smol


@pytest.mark.model
def test_memory_line_says_tokens_stored_and_seen(capsys, smol_cli):
    context = "The meeting is on Tuesday. The room is 4B. Bring the blue folder. " * 6
    code, _, err = _run(capsys, "generate", "--method", "streaming:sink=4,window=16", "--context", context, "--max-new-tokens", "4")
    assert code == 0
    line = err.strip().splitlines()[-1]
    found = re.search(r"holds ([\d.]+ \w+): (\d+) of (\d+) tokens stored \(([\d,]+) B per token seen; uncompressed 46,080 B/token", line)
    assert found, line
    stored, seen = int(found[2]), int(found[3])
    assert stored == 20 and seen > 100  # sink + window of every token the model saw
    assert int(found[4].replace(",", "")) < 46080 and line.endswith("x smaller)")


@pytest.mark.model
def test_max_new_tokens_beyond_the_model_positions(capsys, smol_cli):
    code, _, err = _run(capsys, "generate", "--context", "Hello there.", "--max-new-tokens", "9000")
    _one_line_error(code, err, "at most 8192 positions; lower max_new_tokens to")


@pytest.mark.parametrize(
    "argv, target, message",
    [
        (["info"], "kvcompress.cli._load", "run the command again"),
        (["bench", "--out", "results"], "kvcompress.bench.cli.run_from_args", "kept under results/"),
    ],
)
def test_ctrl_c_is_one_line(capsys, monkeypatch, argv, target, message):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupt)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err.startswith("kvcompress: interrupted; ") and message in err and err.count("\n") == 1


def test_console_script_error_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "kvcompress.cli", "generate", "--method", "nope", "--context", "x"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kvcompress: error: unknown method 'nope'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_ctrl_c_while_the_package_imports_is_one_line(tmp_path, after):
    """The console script (kvcompress_cli) in the seconds torch and transformers import: an interrupt that
    leaves a library half-imported (numpy at ~0.3 s here) is reported as the interrupt too, not its error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "kvcompress_cli", "compress", "--context", "x", "--out", str(tmp_path / "c.kvc")]
    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731  (Ctrl-C not ignored, as in a terminal)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default)
    time.sleep(after)  # importing the package takes seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err == "kvcompress: interrupted; run the command again to start over\n", err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_compress_then_ask_answers_as_generate_does(capsys, smol_cli, tmp_path):
    context = "The meeting is on Tuesday. The room is 4B. Bring the blue folder. " * 4
    method, question = "streaming:sink=4,window=24+kivi:bits=4,residual=8", "Which room is the meeting in?"
    code, direct, _ = _run(capsys, "generate", "--method", method, "--context", context, "--question", question, "--max-new-tokens", "8")
    assert code == 0
    doc = tmp_path / "doc.kvc"
    code, _, err = _run(capsys, "compress", "--method", method, "--context", context, "--out", str(doc))
    assert code == 0 and doc.is_file() and f"saved to {doc}" in err
    code, out, err = _run(capsys, "ask", str(doc), "--question", question, "--max-new-tokens", "8")
    assert code == 0 and out == direct and "28 of" in err  # the answer generate gives; sink + window stored
    questions = [question, "What should you bring?", "Which day is the meeting?"]
    code, out, _ = _run(capsys, "ask", str(doc), *[a for q in questions for a in ("--question", q)], "--max-new-tokens", "8")
    assert code == 0
    assert [line[3:] for line in out.splitlines() if line.startswith("Q: ")] == questions
    assert f"A: {direct.strip()}" in out.splitlines()  # the first answer, asked in a batch, is the single one


@pytest.mark.model
def test_compress_force_replaces_a_file_and_keeps_its_permissions(capsys, smol_cli, tmp_path):
    from kvcompress.persist import CACHE_FORMAT, read_header

    doc = tmp_path / "doc.kvc"
    doc.write_bytes(b"an earlier cache")
    doc.chmod(0o600)
    code, _, err = _run(capsys, "compress", "--context", "The room is 4B.", "--out", str(doc), "--force")
    assert code == 0, err
    assert read_header(doc)["format"] == CACHE_FORMAT and doc.stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [doc]  # no temporary file left beside it


@pytest.mark.model
def test_ask_bad_files_are_one_line(capsys, smol_cli, tmp_path):
    code, _, err = _run(capsys, "ask", str(tmp_path / "missing.kvc"), "--question", "Q?")
    _one_line_error(code, err, "no saved cache at")
    junk = tmp_path / "junk.kvc"
    junk.write_bytes(b"not a cache at all")
    code, _, err = _run(capsys, "ask", str(junk), "--question", "Q?")
    _one_line_error(code, err, "damaged or truncated")
    code, _, err = _run(capsys, "compress", "--context", "x", "--out", str(tmp_path))
    _one_line_error(code, err, "is a folder")


@pytest.mark.model
def test_demo_shows_answers_and_memory_per_method(capsys, smol_cli):
    code, out, err = _run(capsys, "demo", "--tokens", "300", "--methods", "none;streaming:window=32")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("none ", "streaming:"))}
    assert " yes " in rows["none"] and "4721" in rows["none"]  # the uncompressed context answers
    assert " NO " in rows["streaming:window=32"] and "36 of" in rows["streaming:window=32"]  # the fact was evicted
    assert "1.0x" in rows["none"] and "x " in rows["streaming:window=32"]


def test_demo_refuses_bad_flags(capsys):
    code, _, err = _run(capsys, "demo", "--depth", "2")
    _one_line_error(code, err, "--depth must be between 0")
    code, _, err = _run(capsys, "demo", "--methods", "none;kivi:bits=3")
    _one_line_error(code, err, "bits must be 2, 4 or 8")
