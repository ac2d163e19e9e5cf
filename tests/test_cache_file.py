"""A saved cache file: nothing lost, nothing silently wrong (issue 32).

What is on disk changes only as asked (an interrupted save leaves no temporary file and the old file as it
was; a replaced file keeps its permissions; a FIFO is not replaced), and a file is used only after its
checksum and its contents are checked against its spec and the model: any damage is one
:class:`CacheFileError`. Model-free: the tiny random Llama.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kvcompress
from kvcompress.persist import CACHE_FORMAT, CacheFileError, checksum as checksum_of
from kvcompress.cli import main
from kvcompress.models import model_identity
from test_persist import _CharTokenizer

KIVI = "kivi:bits=4,residual=16,group=16"


@pytest.fixture
def saved(tiny, tmp_path):
    """``(path, cache)``: a KIVI cache of the tiny model over a context, saved."""
    cache = kvcompress.compress(tiny, _CharTokenizer(), "The keeper wrote down every ship. " * 4, KIVI)
    return cache.save(tmp_path / "c.kvc"), cache


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def _rewrite(path: Path, tensors=None, checksum: bool = True, **header) -> Path:
    """A copy of ``path`` with some tensors and header fields replaced, under a valid checksum (``checksum``)
    so that the checks behind the checksum are what refuses it."""
    held, meta = _read(path)
    held.update(tensors or {})
    held = {name: t.contiguous() for name, t in held.items() if t is not None}
    meta.update(header)
    if checksum:
        meta["checksum"] = checksum_of(held, meta)
    out = path.with_name("edited.kvc")
    save_file(held, str(out), metadata=meta)
    return out


def _refused(path: Path, model, match: str) -> None:
    with pytest.raises(CacheFileError, match=match) as caught:
        kvcompress.load_cache(path, model)
    assert "\n" not in str(caught.value)


def test_a_saved_file_reloads_with_its_checksum(saved, tiny):
    path, cache = saved
    tensors, meta = _read(path)
    assert meta["format"] == CACHE_FORMAT and meta["checksum"] == checksum_of(tensors, meta)
    loaded = kvcompress.load_cache(path, tiny)
    assert loaded.nbytes == cache.nbytes and loaded.get_seq_length() == cache.get_seq_length()


def test_any_flipped_byte_is_refused(saved, tiny):
    path, _ = saved
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: 8-byte length, JSON header, then the tensors
    for offset in (header + 1, header + (len(data) - header) // 2, len(data) - 1, header - 40, 20):
        flipped = path.with_name("flipped.kvc")
        flipped.write_bytes(data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :])
        _refused(flipped, tiny, "damaged|not a kvcompress cache")


def test_ask_refuses_a_damaged_file_in_one_line(saved, tiny, monkeypatch, capsys):
    path, _ = saved
    monkeypatch.setattr("kvcompress.cli._load", lambda name: (tiny, None))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    code = main(["ask", str(path), "--question", "Which ship?"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kvcompress: error: ") and "is damaged" in err and err.count("\n") == 1, err


def test_an_old_format_file_names_the_version(saved, tiny):
    path, _ = saved
    old = _rewrite(path, format="kvcompress-cache/1")
    _refused(old, tiny, "cache format kvcompress-cache/1, which this kvcompress does not read .it reads kvcompress-cache/2")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: {"layers.0.window.k": t["layers.0.window.k"] * float("nan")}, "layers.0.window.k holds NaN"),
        (lambda t: {"layers.1.store.tensors.key_scale": t["layers.1.store.tensors.key_scale"] + float("inf")}, "holds NaN or infinite"),
        (lambda t: {"layers.0.store.tensors.value_codes": t["layers.0.store.tensors.value_codes"][:, :, :-16]}, "stores for this model .key codes hold 112 tokens.*value codes, scales and minimums .96, 112, 112. tokens: they must agree"),
        (lambda t: {"layers.0.store.tensors.key_codes": t["layers.0.store.tensors.key_codes"][..., :-16]}, "does not hold what its spec"),
        (lambda t: {"layers.1.store.tensors.key_min": None}, "no entry 'store.tensors.key_min'"),
        (lambda t: {f"layers.1.window.{x}": t[f"layers.1.window.{x}"][:, :1] for x in "kv"}, "layer 1 holds keys .1, 1, "),
        (lambda t: {"context.ids": t["context.ids"] + 1000}, "not .rows, tokens. ids of the vocabulary"),
    ],
    ids=["nan-keys", "inf-scales", "truncated-value-codes", "truncated-key-codes", "missing-entry", "one-head", "ids-beyond-vocabulary"],
)
def test_tensors_that_do_not_fit_the_spec_and_model_are_refused(saved, tiny, edit, match):
    path, _ = saved
    _refused(_rewrite(path, edit(_read(path)[0])), tiny, match)


@pytest.mark.parametrize(
    "header, match",
    [
        ({"spec": "none"}, "spec 'none' stores.*entries no layer of it holds: .'layers.0.store"),
        ({"spec": "kivi:bits=3"}, "its method spec 'kivi:bits=3' cannot be built for this model .kivi: bits must be"),
        ({"seen": "7"}, "the header says 7"),
        ({"seen": "many"}, "damaged header"),
        ({"dtype": "torch.int8"}, "damaged header .*not a floating-point"),
        ({"dtype": "torch.bfloat16"}, "not .2 heads, .* in torch.bfloat16"),
        ({"scalars": "[1, 2"}, "damaged header"),
        ({"identity": "null"}, "damaged header"),
    ],
)
def test_a_header_that_does_not_fit_its_tensors_is_refused(saved, tiny, header, match):
    path, _ = saved
    _refused(_rewrite(path, **header), tiny, match)


def test_one_changed_mlp_weight_is_another_model(saved, tiny):
    path, _ = saved
    model = copy.deepcopy(tiny)
    before = model_identity(model)
    weight = model.model.layers[1].mlp.down_proj.weight
    value = weight[7, 200].item()
    with torch.no_grad():
        weight[7, 200] = value + 0.01  # one value of one MLP matrix, changed in place (beyond bfloat16 rounding)
    assert model_identity(model)["weights"] != before["weights"]
    _refused(path, model, "saved for another model .*weights")
    with torch.no_grad():
        weight[7, 200] = value
    assert model_identity(model) == before == model_identity(tiny)


def test_an_interrupted_save_leaves_the_old_file_and_no_temporary_file(saved, monkeypatch):
    path, cache = saved
    before = path.read_bytes()

    def interrupted(tensors, name, metadata):
        Path(name).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("kvcompress.persist.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_replaced_file_keeps_its_permissions_and_a_fifo_is_not_replaced(saved, tmp_path):
    path, cache = saved
    path.chmod(0o600)
    cache.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    fifo = tmp_path / "pipe.kvc"
    os.mkfifo(fifo)
    with pytest.raises(CacheFileError, match="is not a regular file"):
        cache.save(fifo)
    assert fifo.is_fifo()


def test_sigterm_during_a_save_removes_its_temporary_file_and_is_one_line(tmp_path):
    """The real CLI in a subprocess: SIGTERM while ``compress`` writes --out."""
    out = tmp_path / "c.kvc"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import kvcompress, kvcompress.persist, kvcompress.cli
        from test_cache_file import _tiny_model
        from test_persist import _CharTokenizer

        class Tokenizer(_CharTokenizer):
            def __len__(self):
                return 128

        model, tokenizer = _tiny_model(), Tokenizer()
        kvcompress.cli._load = lambda name: (model, tokenizer)

        def slow(tensors, name, metadata):
            Path(name).write_bytes(b"half a file")
            print("writing", flush=True)
            time.sleep(60)

        kvcompress.persist.save_file = slow
        sys.exit(kvcompress.cli.main(["compress", "--method", {KIVI!r}, "--context", "a ship " * 8, "--out", {str(out)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        assert (tmp_path / ".c.kvc.tmp").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2 and err.startswith("kvcompress: interrupted; ") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def _tiny_model():
    """The ``tiny`` fixture's model, for a subprocess (the same seed and config)."""
    from conftest import tiny

    return tiny.__wrapped__()
