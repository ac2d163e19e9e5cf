"""``kvcompress calibrate``: usage errors before any model loads, and a file tagged with the model."""

import pytest

from kvcompress.cli import main


def test_bad_arguments_end_with_one_line(capsys, tmp_path):
    assert main(["calibrate", "--tokens", "10"]) == 2
    assert "at least 256" in capsys.readouterr().err
    assert main(["calibrate", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_out_fails_before_the_model_loads(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("kvcompress.cli._load", lambda name: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path / "file" / "c.safetensors", "cannot write --out"), (tmp_path, "is a folder")]:
        assert main(["calibrate", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvcompress: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


@pytest.mark.model
def test_calibrate_writes_a_file_for_the_model(smol, tmp_path, capsys):
    from kvcompress.calibration import Calibration

    text = tmp_path / "prose.txt"
    text.write_text("A river runs through the valley, past farms and mills, to the sea. " * 40, encoding="utf-8")
    out = tmp_path / "smol.safetensors"
    assert main(["calibrate", "--text", str(text), "--tokens", "512", "--out", str(out)]) == 0
    assert "prose.txt" in capsys.readouterr().err
    model, _ = smol
    calibration = Calibration.load(out, model)  # checks the identity
    assert calibration.tokens == 512 - 4 and calibration.keys_cov.shape == (30, 192, 192)
