"""Calibration: statistics of a model's cached keys and values, measured once on sample text.

Methods that need to know what a model's K/V look like (``lowrank`` bases, ``share_heads`` groups)
read a :class:`Calibration`: per layer, the mean and covariance of the keys and of the values over
all KV heads of the layer jointly (``E = H * D`` dims, so a per-head statistic is a diagonal block
and head-to-head similarity is an off-diagonal one). Keys are measured *before* rotary embedding:
the cache receives rotated keys, and :class:`Rotary` undoes the rotation at each token's position
(see ``methods/lowrank.py`` for why pre-rotary).

A calibration is saved as a safetensors file tagged with the model's identity (shapes plus a hash
of some of its weights); loading it for another model raises :class:`CalibrationError`. Default
calibrations live in ``<cache_dir>/calibration/`` (next to converted models, see
:func:`kvcompress.folders.cache_dir`); :func:`load_or_build` finds or builds them, saying so on
stderr when it builds.

A calibration may also hold per-head retrieval scores (:func:`retrieval_heads`: how much each KV
head copies from far context, measured on synthetic key-value text), which the ``retrieval``
allocation reads; they are added to the model's calibration file the first time they are needed.

The default text is standard-library source that the benchmark harness never scores (its ``code``
text reads other modules and its default ``prose`` text is pydoc's help topics), so a benchmark
never evaluates on the text its calibration saw.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import random
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache

from kvcompress.folders import cache_dir
from kvcompress.models import cache_kwarg, identity_differences, model_identity, model_name

FORMAT = "1"
# Modules the benchmark harness never reads (kvcompress.bench.texts.CODE_MODULES are others).
CALIBRATION_MODULES = ("statistics", "heapq", "collections", "logging", "configparser")
DEFAULT_TOKENS = 4096
MIN_TOKENS = 256
SINK = 4  # the first tokens of a sequence (attention sinks) are outliers: left out of the statistics


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or made for another model."""


def calibration_text() -> str:
    """The default calibration text: the sources of :data:`CALIBRATION_MODULES`, concatenated."""
    parts = [Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8") for m in CALIBRATION_MODULES]
    return "\n\n".join(parts)


@dataclass
class Calibration:
    """Per-layer K/V statistics of one model (``L`` layers, ``E = H * D`` joint head dims).

    Attributes:
        identity: :func:`model_identity` of the model measured.
        keys_mean: ``(L, E)`` mean pre-rotary key, heads concatenated.
        keys_cov: ``(L, E, E)`` covariance of the keys.
        values_mean: ``(L, E)``.
        values_cov: ``(L, E, E)``.
        tokens: tokens measured (after the first :data:`SINK`).
        text: what was measured (``"stdlib:statistics,heapq,..."`` or a file name).
    """

    identity: dict
    keys_mean: torch.Tensor
    keys_cov: torch.Tensor
    values_mean: torch.Tensor
    values_cov: torch.Tensor
    tokens: int
    text: str
    retrieval: torch.Tensor | None = None  # (L, H) retrieval_heads scores, once measured

    @property
    def heads(self) -> int:
        return int(self.identity["kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.identity["head_dim"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "keys.mean": self.keys_mean,
            "keys.cov": self.keys_cov,
            "values.mean": self.values_mean,
            "values.cov": self.values_cov,
        }
        metadata = {"format": FORMAT, "identity": json.dumps(self.identity), "tokens": str(self.tokens), "text": self.text}
        if self.retrieval is not None:
            tensors["retrieval"] = self.retrieval
            metadata["retrieval_measure"] = RETRIEVAL_MEASURE
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # one per writer: two processes may race
        os.close(fd)
        try:
            save_file({k: v.contiguous().float() for k, v in tensors.items()}, tmp, metadata=metadata)
            Path(tmp).replace(path)  # atomic: a concurrent reader never sees half a file
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> Calibration:
        """Read a calibration file; with ``model``, check that it was made for that model.

        Raises:
            CalibrationError: the file is missing or not a kvcompress calibration, or it was made for
                another model (the message names what differs and how to make the right one).
        """
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file {str(path)!r} does not exist; make one with `kvcompress calibrate --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for a bad file
            raise CalibrationError(f"{str(path)!r} is not a safetensors file ({err}); make one with `kvcompress calibrate`") from None
        if meta.get("format") != FORMAT or "keys.cov" not in tensors:
            raise CalibrationError(f"{str(path)!r} is not a kvcompress calibration (format {FORMAT}); make one with `kvcompress calibrate`")
        calibration = cls(
            identity=json.loads(meta["identity"]),
            keys_mean=tensors["keys.mean"],
            keys_cov=tensors["keys.cov"],
            values_mean=tensors["values.mean"],
            values_cov=tensors["values.cov"],
            tokens=int(meta["tokens"]),
            text=meta.get("text", ""),
            retrieval=tensors.get("retrieval") if meta.get("retrieval_measure", "1") == RETRIEVAL_MEASURE else None,
        )
        if model is not None:
            calibration.check(model, path)
        return calibration

    def check(self, model, path: str | Path = "<memory>") -> None:
        """Raise :class:`CalibrationError` unless this calibration was made for ``model``."""
        differ = identity_differences(self.identity, model_identity(model))
        if differ:
            raise CalibrationError(
                f"calibration {str(path)!r} was made for another model ({'; '.join(differ)}); "
                f"make one for this model with `kvcompress calibrate --model <this model> --out FILE`, "
                f"or leave calibration= unset to use this model's default calibration"
            )


def default_path(model) -> Path:
    """Where the default calibration of ``model`` lives: ``<cache_dir>/calibration/<identity>.safetensors``."""
    ident = model_identity(model)
    stem = f"{ident['model_type']}-{ident['layers']}x{ident['kv_heads']}x{ident['head_dim']}-{ident['weights']}"
    return cache_dir() / "calibration" / f"{stem}.safetensors"


class Rotary:
    """The rotary embedding of a model's full-attention layers, as tables indexed by position.

    Uses the model's own ``rotary_emb`` module and its modeling file's ``rotate_half``, so it follows
    the model's convention (including Gemma 3's per-layer-type frequencies). Tables grow to the
    largest position asked for, in powers of two, and their bytes are reported by :attr:`nbytes`.

    Raises:
        ValueError: the model has no rotary embedding kvcompress knows how to undo.
    """

    def __init__(self, model, layer_type: str = "full_attention"):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.emb = getattr(decoder, "rotary_emb", None)
        self.rotate_half = getattr(sys.modules[type(model).__module__], "rotate_half", None)
        if self.emb is None or self.rotate_half is None:
            raise ValueError(
                f"{type(model).__name__} has no rotary embedding module (rotary_emb) with a rotate_half "
                "function: lowrank's pre-rotary key basis needs a RoPE model such as Llama, Qwen, Mistral or Gemma"
            )
        self.kwargs = {"layer_type": layer_type} if "layer_type" in inspect.signature(self.emb.forward).parameters else {}
        cfg = model.config.get_text_config()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # (P, D) each; one attribute, replaced at once

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cos_sin or ())

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` broadcastable to ``positions.shape + (D,)``.

        Positions shared by every head (``(B, H, N)`` equal along ``H``) give ``(B, 1, N, D)``
        tables, and consecutive positions of one row a view of the table: no gather.
        """
        if positions.dim() >= 3 and positions.shape[-2] > 1 and bool((positions == positions[..., :1, :]).all()):
            positions = positions[..., :1, :]
        cos, sin = self.table(int(positions.max()) + 1 if positions.numel() else 1, dtype, positions.device)
        if positions.dim() and all(size == 1 for size in positions.shape[:-1]) and positions.shape[-1] > 1:
            first, n = int(positions.flatten()[0]), positions.shape[-1]
            if int(positions.flatten()[-1]) == first + n - 1 and bool((positions.diff(dim=-1) == 1).all()):
                shape = (*positions.shape, cos.shape[-1])  # consecutive positions: a view, no gather
                return cos[first : first + n].expand(shape), sin[first : first + n].expand(shape)
        return cos[positions], sin[positions]

    def table(self, top: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, D)`` ``cos`` and ``sin`` tables of at least positions ``0 .. top - 1``.

        Safe from several threads (caches of one model share it, see :func:`rotary_of`): a table is
        replaced, never changed, and each caller reads the pair it was given."""
        held = self.cos_sin
        if held is not None and top <= held[0].shape[0] and held[0].dtype == dtype:
            return held
        size = max(256, 1 << (top - 1).bit_length())
        ref = torch.zeros((), dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = self.emb(ref, torch.arange(size, device=device)[None], **self.kwargs)
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"partial rotary embeddings ({cos.shape[-1]} of {self.head_dim} dims) are not supported")
        tables = self.cos_sin = (cos[0].to(dtype), sin[0].to(dtype))
        return tables

    @functools.cached_property
    def half_split(self) -> bool:
        """Whether the model rotates the two halves of a head against each other (Llama's ``rotate_half``),
        the layout ``kvcompress::lowrank_logits`` assumes."""
        x = torch.arange(1.0, self.head_dim + 1)
        half = self.head_dim // 2
        return torch.equal(self.rotate_half(x), torch.cat([-x[half:], x[:half]]))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the rotation of ``positions`` ``(...)`` to ``x`` ``(..., D)``."""
        cos, sin = self.tables(positions, x.dtype)
        return x * cos + self.rotate_half(x) * sin

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`rotate`: a rotation by minus the same angles."""
        cos, sin = self.tables(positions, x.dtype)
        return x * cos - self.rotate_half(x) * sin


def rotary_of(model) -> Rotary | None:
    """The model's :class:`Rotary`, or None when it has no rotary embedding kvcompress can undo.

    One per model, shared by every cache made for it (its tables are built once, not per cache), and
    dropped with the model.
    """
    with _ROTARIES_LOCK:
        if model not in _ROTARIES:
            try:
                _ROTARIES[model] = Rotary(model)
            except ValueError:
                _ROTARIES[model] = None
        return _ROTARIES[model]


_ROTARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Rotary or None
_ROTARIES_LOCK = threading.Lock()


class _CountingCache(DynamicCache):
    """A DynamicCache that advances a progress bar as each layer's K/V arrive."""

    def __init__(self, config, bar):
        super().__init__(config=config)
        self.bar = bar

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.bar is not None:
            self.bar.update(1)
        return out


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (H, T, D)`` -> mean ``(H*D,)`` and covariance ``(H*D, H*D)`` of the concatenated heads."""
    joint = x.transpose(0, 1).flatten(1).double()  # (T, H*D)
    mean = joint.mean(0)
    centered = joint - mean
    return mean.float(), (centered.T @ centered / joint.shape[0]).float()


@torch.no_grad()
def calibrate(model, tokenizer, text: str | None = None, tokens: int = DEFAULT_TOKENS, progress: bool = True, text_name: str | None = None) -> Calibration:
    """Measure the K/V statistics of ``model`` on ``tokens`` tokens of ``text``, in one forward.

    One sequence (not chunks) so that post-rotary keys are seen at every position up to ``tokens``.

    Args:
        text: sample text; None for :func:`calibration_text`.
        tokens: tokens measured (at most the model's position range).
        progress: show a progress bar (one step per layer) on stderr.
        text_name: recorded in the file; defaults to a description of ``text``.

    Raises:
        CalibrationError: the text is shorter than :data:`MIN_TOKENS` tokens.
    """
    if text is None:
        text, text_name = calibration_text(), "stdlib:" + ",".join(CALIBRATION_MODULES)
    cfg = model.config.get_text_config()
    tokens = min(tokens, getattr(cfg, "max_position_embeddings", tokens) or tokens)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens].to(model.device)
    if ids.shape[1] < MIN_TOKENS:
        raise CalibrationError(f"the calibration text has {ids.shape[1]} tokens; give at least {MIN_TOKENS}")
    bar = tqdm(total=cfg.num_hidden_layers, desc=f"calibrating on {ids.shape[1]} tokens", unit="layer", disable=not progress, file=sys.stderr)
    cache = _CountingCache(model.config, bar)
    model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    bar.close()
    stats = {"keys": ([], []), "values": ([], [])}
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    rotaries = {t: Rotary(model, t) for t in set(layer_types)}
    for layer, layer_type in zip(cache.layers, layer_types):
        held = layer.keys.shape[2]  # a sliding-window layer holds only the last tokens
        positions = torch.arange(ids.shape[1] - held, ids.shape[1], device=layer.keys.device)
        keys = rotaries[layer_type].unrotate(layer.keys[0].float(), positions)  # (H, T, D) pre-rotary
        for name, x in (("keys", keys), ("values", layer.values[0])):
            mean, cov = _moments(x[:, SINK:].float())  # (H, T, D) without the sinks
            stats[name][0].append(mean)
            stats[name][1].append(cov)
    return Calibration(
        identity=model_identity(model),
        keys_mean=torch.stack(stats["keys"][0]),
        keys_cov=torch.stack(stats["keys"][1]),
        values_mean=torch.stack(stats["values"][0]),
        values_cov=torch.stack(stats["values"][1]),
        tokens=ids.shape[1] - SINK,
        text=text_name or "text",
    )


def load_or_build(model, path: str | Path | None = None) -> Calibration:
    """The calibration at ``path``, or the model's default one, built and saved on first use.

    Raises:
        CalibrationError: ``path`` is given but missing, invalid or made for another model; or the
            default one must be built and the model's tokenizer cannot be loaded.
    """
    if path:
        return Calibration.load(path, model)
    default = default_path(model)
    if default.is_file():
        return Calibration.load(default, model)
    tokenizer = _tokenizer_of(model)
    print(f"kvcompress: calibrating {model_name(model)} for the first time -> {default} (once, ~1 min on CPU)", file=sys.stderr, flush=True)
    calibration = calibrate(model, tokenizer)
    calibration.save(default)
    return calibration


def load_retrieval_heads(model, path: str | Path | None = None) -> torch.Tensor:
    """``(L, H)`` retrieval scores of ``model``'s KV heads from its calibration (``path``, or the
    default one), measured with :func:`retrieval_heads` and saved into the file on first use.

    Raises:
        CalibrationError: as :func:`load_or_build`; or ``path`` holds no retrieval scores.
    """
    calibration = load_or_build(model, path)
    if calibration.retrieval is None:
        if path:
            raise CalibrationError(
                f"calibration {str(path)!r} holds no retrieval-head scores (or those of another measure); "
                f"make it again with `kvcompress calibrate --retrieval-heads`"
            )
        print(f"kvcompress: measuring the retrieval heads of {model_name(model)} -> {default_path(model)} (once)", file=sys.stderr, flush=True)
        calibration.retrieval = retrieval_heads(model, _tokenizer_of(model))
        calibration.save(default_path(model))
    return calibration.retrieval


RETRIEVAL_SAMPLES = 4  # synthetic key-value lists, the needle at a different depth in each
RETRIEVAL_PAIRS = 40  # key-value lines per list
# What retrieval_heads measures; a file's scores of another measure are measured again. Lists of
# words and hex codes as well as numbers (measure "2", 12 lists) chose 3 other heads of the 22 kept
# at 4x and retrieved 14/32 RULER-style cases at 4,096 tokens against 21/32 with this measure.
RETRIEVAL_MEASURE = "1"


@torch.no_grad()
def retrieval_heads(model, tokenizer, samples: int = RETRIEVAL_SAMPLES, pairs: int = RETRIEVAL_PAIRS) -> torch.Tensor:
    """``(L, H)`` float32: how much each KV head of each layer attends to a needle it must copy.

    On synthetic lists of ``pairs`` lines ``key <hex> holds <number>.`` (seeded, a text the benchmarks
    never score) followed by the question for one key and, teacher-forced, its answer, a head's score
    is the attention mass the queries that predict each answer token put on the needle's number,
    averaged over those queries, the query heads of the KV head and the ``samples`` lists (the
    retrieval-head measure of DuoAttention / RazorAttention). Runs the model with eager attention,
    restored afterwards.
    """
    rng = random.Random("kvcompress-retrieval-heads")
    cfg = model.config.get_text_config()
    heads = cfg.num_key_value_heads
    total = torch.zeros(cfg.num_hidden_layers, heads)
    previous = model.config._attn_implementation

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    try:
        model.set_attn_implementation("eager")
        for sample in range(samples):
            lines = [(f"{rng.getrandbits(24):06x}", str(rng.randrange(10_000, 100_000))) for _ in range(pairs)]
            needle = (sample * pairs) // samples + rng.randrange(pairs // samples)
            ids = tokenizer("Remember these entries.\n")["input_ids"]
            for i, (key, value) in enumerate(lines):
                ids += encode(f"key {key} holds ")
                if i == needle:
                    span = (len(ids), len(ids) + len(encode(value)))
                ids += encode(value) + encode(".\n")
            key, value = lines[needle]
            ids += encode(f"\nWhich number does key {key} hold? Key {key} holds ")
            answer = (len(ids), len(ids) + len(encode(value)))
            ids += encode(value)
            out = model(torch.tensor([ids], device=model.device), output_attentions=True, use_cache=False)
            for layer, weights in enumerate(out.attentions):  # (1, Hq, T, T)
                mass = weights[0, :, answer[0] - 1 : answer[1] - 1, span[0] : span[1]].float().sum(-1).mean(-1)  # (Hq,)
                total[layer] += mass.view(heads, -1).mean(1).cpu()
    finally:
        model.set_attn_implementation(previous)
    return total / samples


def _tokenizer_of(model):
    source = model.config._name_or_path
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - any failure means: no tokenizer to be found from the model
        raise CalibrationError(
            f"no calibration for {model_name(model)} yet and its tokenizer cannot be loaded from {source!r} ({err}); "
            "make one with `kvcompress calibrate --model <model> --out FILE` and pass calibration=FILE, "
            "or call kvcompress.calibration.calibrate(model, tokenizer).save(kvcompress.calibration.default_path(model))"
        ) from None
