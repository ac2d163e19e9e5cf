"""Where a decode step's time goes, per method: the layers' append, attention and compress, in turns.

    python experiments/decode_parts.py none@1024 none@4096 "tova:ratio=0.75@4096" ...

Each argument is a method spec and a context length (``spec@C``). Every method's cache is prefilled
with the first C tokens of the text ``prose``; then, for 6 rounds after a warm-up round, each takes 4
greedy decode steps in turn (so drift of the machine reaches every method alike), at 1 thread. Printed:
the median step, and the median per step of the time all layers spent in ``CompressedLayer.append``
(storing the step's token, building the operands), ``kvcompress.attention.attend`` and
``CompressedLayer.compress`` (observation, eviction, settling), in milliseconds. The rest of a step is
the model's own work. Timers add about a microsecond per call.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from kvcompress import attention, cache
from kvcompress.bench.feed import step
from kvcompress.bench.methods import resolve
from kvcompress.bench.speed import _fill_batch
from kvcompress.bench.texts import load_text
from kvcompress.models import load_model

PARTS = ("append", "attend", "compress")


def _timed(owner, name: str, spent: dict) -> None:
    """Wrap ``owner.name`` so that each call adds its seconds to ``spent[name]``."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    setattr(owner, name, timed)


def main(arguments: list[str]) -> None:
    torch.set_num_threads(1)
    spent = dict.fromkeys(PARTS, 0.0)
    _timed(cache.CompressedLayer, "append", spent)
    _timed(cache.CompressedLayer, "compress", spent)
    _timed(attention, "attend", spent)  # cache.py calls attention.attend through the module
    model, tokenizer = load_model()
    ids = torch.tensor([tokenizer.encode(load_text("prose").body)])
    runs = []
    with torch.no_grad():
        for argument in arguments:
            spec, context = argument.rsplit("@", 1)
            method = resolve(spec)
            layers, logits = _fill_batch(method, model, ids[:, : int(context)], 1, None, tokenizer)
            runs.append({"name": argument, "method": method, "cache": layers, "token": logits[:, -1:].argmax(-1),
                         "position": int(context), "step": [], **{part: [] for part in PARTS}})
        for round_ in range(7):
            for run in runs:
                with run["method"].session(model, run["cache"]):
                    for _ in range(4):
                        spent.update(dict.fromkeys(PARTS, 0.0))
                        start = time.perf_counter()
                        logits = step(model, run["cache"], run["token"], run["position"])
                        run["token"], run["position"] = logits[:, -1:].argmax(-1), run["position"] + 1
                        if round_:  # the first round warms up
                            run["step"].append(time.perf_counter() - start)
                            for part in PARTS:
                                run[part].append(spent[part])
    print(f"{'method@C':45s} {'step':>6s} " + " ".join(f"{part:>8s}" for part in PARTS) + "  (ms, medians)")
    for run in runs:
        figures = [1000 * statistics.median(run[key]) for key in ("step", *PARTS)]
        print(f"{run['name']:45s} {figures[0]:6.1f} " + " ".join(f"{f:8.1f}" for f in figures[1:]))


if __name__ == "__main__":
    main(sys.argv[1:] or ["none@1024", "none@4096", "tova:ratio=0.75@4096"])
