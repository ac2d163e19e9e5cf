"""Turn measured parts into rows, ratios against ``none``, one printed table, CSV and JSON.

Pure bookkeeping: no tensors, no model. A *part* is one measurement of one (method, context):
``speed`` and ``throughput`` (from :mod:`kvcompress.bench.speed`), ``perplexity`` (one part per
text: ``perplexity[<text>]``, or ``perplexity`` when only one text is measured) and ``retrieval``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvcompress.bench.methods import BASELINE

COLUMNS = (  # the perplexity column is one per text: "ppl <text> (Δ% vs none)"
    "method",
    "C",
    "KV bytes/token",
    "compression ×",
    "perplexity",
    "retrieval acc.",
    "prefill ms (× none)",
    "prefill added (× none)",
    "decode ms/token (× none)",
    "peak memory (× none)",
)
KVPRESS_MARK = "†"
STALE_MARK = "*"
PEER_MARK = "‡"


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _perplexities(result: dict, conditions: dict) -> dict[str, dict]:
    """A result's perplexity parts by text name: ``perplexity[kjv]`` -> ``kjv``; the part ``perplexity``
    (one text) is named after the conditions' text."""
    found = {}
    for part, data in result.items():
        if part == "perplexity" or part.startswith("perplexity["):
            name = part.partition("[")[2].rstrip("]") or conditions.get("text", "text")
            found[name] = data
    return found


def _held_per_token(result: dict, conditions: dict) -> float | None:
    """KV bytes per context token a result's perplexity parts recorded after compressing their contexts
    (mean over windows and texts), or None: parts measured before they recorded it, or no perplexity."""
    held = [
        (sum(p["kv_bytes_after_context"]) / len(p["kv_bytes_after_context"]), p["context_tokens"])
        for p in _perplexities(result, conditions).values()
        if p and p.get("kv_bytes_after_context")
    ]
    return sum(b / t for b, t in held) / len(held) if held else None


def build_rows(results: list[dict], conditions: dict) -> list[dict]:
    """One flat row per (method, context), with every raw figure, ratios to ``none`` and the conditions.

    Args:
        results: dicts with ``spec``, ``source``, ``context``, the parts ``speed``, ``perplexity`` (or
            ``perplexity[<text>]``, one per text), ``retrieval``, ``throughput`` (each a dict, or None
            when not measured) and, optionally, ``stale``: what differed in the code that measured a
            part shown (``""``: nothing).
        conditions: model, dtype, device, threads, batch, lengths, versions: copied into every row.

    Returns:
        Rows in the order of ``results``; ``stale`` is ``""`` or what measured the row's parts.
        Perplexity is ``ppl[<text>]`` and ``ppl_delta_pct[<text>]`` per text; ``perplexity_delta_pct``
        is the mean of the texts' (``perplexity`` too, with one text).
    """
    base = {r["context"]: r for r in results if r["spec"] == BASELINE}
    rows = []
    for r in results:
        ref = base.get(r["context"], {})
        speed, ret, thr = r.get("speed"), r.get("retrieval"), r.get("throughput")
        ref_speed, ref_thr = ref.get("speed"), ref.get("throughput")
        row = {"method": r["spec"], "source": r["source"], "context": r["context"], "stale": r.get("stale", "")}
        if speed:
            row["kv_bytes"] = speed["kv_bytes_after_prefill"]
            row["kv_bytes_per_token"] = speed["kv_bytes_after_prefill"] / speed["context_tokens"]
            row["prefill_s"] = speed["prefill_s"]
            row["decode_ms_per_token"] = speed["decode_ms_per_token"]
            row["peak_memory_bytes"] = speed["peak_memory_bytes"]
            row["prefill_peak_memory_bytes"] = speed.get("prefill_peak_memory_bytes")  # absent before it was measured
            row["prefill_added_bytes"] = speed.get("prefill_added_bytes")
            row["memory_after_load_bytes"] = speed["memory_after_load_bytes"]
            row["memory_kind"] = speed["memory_kind"]
            if ref_speed:
                ref_per_token = ref_speed["kv_bytes_after_prefill"] / ref_speed["context_tokens"]
                row["compression"] = _ratio(ref_per_token, row["kv_bytes_per_token"])
                row["prefill_x"] = _ratio(speed["prefill_s"], ref_speed["prefill_s"])
                # measured in turns (speed.measure_interleaved): against none's steps in the same rounds
                base_decode = speed.get("baseline_decode_ms", ref_speed["decode_ms_per_token"])
                row["decode_x"] = speed.get("decode_x_rounds", _ratio(speed["decode_ms_per_token"], base_decode))
                row["peak_memory_x"] = _ratio(speed["peak_memory_bytes"], ref_speed["peak_memory_bytes"])
                row["prefill_peak_memory_x"] = _ratio(row["prefill_peak_memory_bytes"], ref_speed.get("prefill_peak_memory_bytes"))
                row["prefill_added_x"] = _ratio(row["prefill_added_bytes"], ref_speed.get("prefill_added_bytes"))
        elif held := _held_per_token(r, conditions):  # no speed part: the bytes perplexity's caches held
            row["kv_bytes_per_token"] = held
            # none's from its perplexity, or from its speed part's prefill (the same C tokens, held in full)
            ref_held = _held_per_token(ref, conditions) or (
                ref_speed["kv_bytes_after_prefill"] / ref_speed["context_tokens"] if ref_speed else None)
            row["compression"] = _ratio(ref_held, held)
        ref_ppl = _perplexities(ref, conditions)
        deltas = []
        for name, ppl in _perplexities(r, conditions).items():
            if not ppl:
                continue
            row[f"ppl[{name}]"] = ppl["perplexity"]
            if ref_ppl.get(name):
                row[f"ppl_delta_pct[{name}]"] = 100 * (ppl["perplexity"] / ref_ppl[name]["perplexity"] - 1)
                deltas.append(row[f"ppl_delta_pct[{name}]"])
        if deltas:
            row["perplexity_delta_pct"] = sum(deltas) / len(deltas)
        if r.get("perplexity"):  # one text: its perplexity, under the name rows had before several texts
            row["perplexity"] = r["perplexity"]["perplexity"]
        if ret:
            row["retrieval_correct"] = ret["correct"]
            row["retrieval_cases"] = ret["cases"]
            row["retrieval_acc"] = ret["correct"] / ret["cases"]
            # Parts stored before task sets named the counts by_form (read with --reuse-stale).
            for task, (correct, total) in ret.get("by_task", ret.get("by_form", {})).items():
                row[f"retrieval_acc_{task}"] = correct / total
            for task, found in ret.get("recall_by_task", {}).items():
                row[f"retrieval_recall_{task}"] = found
        if thr:
            row["throughput_budget_bytes"] = thr["budget_bytes"]
            row["throughput_bytes_per_seq"] = thr["bytes_per_sequence"]
            row["throughput_batch"] = thr["batch"]
            row["throughput_cache_bytes"] = thr["cache_bytes"]
            row["throughput_tokens_per_s"] = thr["tokens_per_s"]
            if ref_thr:
                # measured in turns (speed.measure_interleaved): none's tokens/s in the same rounds
                row["throughput_x"] = _ratio(thr["tokens_per_s"], thr.get("baseline_tokens_per_s", ref_thr["tokens_per_s"]))
        row.update(conditions)
        rows.append(row)
    return rows


def _fmt_x(x: float | None) -> str:
    return f" ({x:.2f}×)" if x is not None else ""


def _label(row: dict) -> str:
    """The method, marked when stale and when kvpress or a transformers peer compressed it (the table's
    footnotes say so)."""
    mark = {"kvpress": f" {KVPRESS_MARK}", "peer": f" {PEER_MARK}"}.get(row["source"], "")
    return row["method"] + (STALE_MARK if row["stale"] else "") + mark


def _mib(value: float | None) -> str:
    return f"{value / 2**20:,.0f} MiB" if value is not None else "n/a"


def text_names(rows: list[dict]) -> list[str]:
    """The perplexity texts of ``rows``, in the order met: the ``<text>`` of their ``ppl[<text>]`` keys."""
    return list(dict.fromkeys(k[4:-1] for row in rows for k in row if k.startswith("ppl[")))


def _cells(row: dict, texts: list[str]) -> list[str]:
    missing = "n/a"
    cells = [_label(row), str(row["context"])]
    if "kv_bytes_per_token" in row:
        cells.append(f"{row['kv_bytes_per_token']:,.0f}")
        cells.append(f"{row['compression']:.2f}×" if row.get("compression") else missing)
    else:
        cells += [missing, missing]
    for text in texts or [None]:
        if f"ppl[{text}]" in row:
            delta = row.get(f"ppl_delta_pct[{text}]")
            cells.append(f"{row[f'ppl[{text}]']:.3f}" + (f" ({delta:+.1f}%)" if delta is not None else ""))
        else:
            cells.append(missing)
    if "retrieval_acc" in row:
        cells.append(f"{100 * row['retrieval_acc']:.0f}% ({row['retrieval_correct']}/{row['retrieval_cases']})")
    else:
        cells.append(missing)
    if "prefill_s" in row:
        cells.append(f"{1000 * row['prefill_s']:,.0f}" + _fmt_x(row.get("prefill_x")))
        cells.append(_mib(row.get("prefill_added_bytes")) + _fmt_x(row.get("prefill_added_x")))
        cells.append(f"{row['decode_ms_per_token']:.1f}" + _fmt_x(row.get("decode_x")))
        cells.append(_mib(row["peak_memory_bytes"]) + _fmt_x(row.get("peak_memory_x")))
    else:
        cells += [missing] * 4
    return cells


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    def line(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, body)])


def format_table(rows: list[dict]) -> str:
    """The main table: a row per method and context, in the order given; a perplexity column per text."""
    texts = text_names(rows)
    at = COLUMNS.index("perplexity")
    header = [*COLUMNS[:at], *([f"ppl {t} (Δ% vs none)" for t in texts] or ["perplexity (Δ% vs none)"]), *COLUMNS[at + 1 :]]
    text = _grid(header, [_cells(r, texts) for r in rows])
    stale = dict.fromkeys(r["stale"] for r in rows if r["stale"])
    if stale:
        text += f"\n{STALE_MARK} measured by other code: {'; '.join(stale)}"
    if any(r["source"] == "kvpress" for r in rows):
        text += f"\n{KVPRESS_MARK} compressed by NVIDIA kvpress through its press hooks, not by kvcompress"
    if any(r["source"] == "peer" for r in rows):
        text += f"\n{PEER_MARK} transformers' own QuantizedCache (its backend named in the spec), not kvcompress"
    return text


def format_throughput(rows: list[dict]) -> str:
    """Batched decode under one KV memory budget: the largest batch whose cache fits, the cache bytes
    measured at that batch, and tokens/s (× none's, at its batch under the same budget)."""
    body = [
        [_label(r), str(r["context"]), _mib(r["throughput_budget_bytes"]), f"{r['throughput_bytes_per_seq']:,}",
         str(r["throughput_batch"]), f"{r['throughput_cache_bytes']:,}",
         f"{r['throughput_tokens_per_s']:,.1f}" + _fmt_x(r.get("throughput_x"))]
        for r in rows if "throughput_batch" in r
    ]
    if not body:
        return ""
    header = ["method", "C", "KV budget", "KV bytes/sequence", "batch", "KV bytes at batch", "decode tok/s (× none)"]
    return _grid(header, body)


def format_retrieval(rows: list[dict], tasks: tuple[str, ...], list_tasks: tuple[str, ...] = ()) -> str:
    """Retrieval accuracy per task and averaged over all cases: a row per method and context, each cell
    followed by the uncompressed baseline's at the same context in brackets, e.g. ``75% [100%]``, and
    the difference of the averages in points. A task of ``list_tasks`` also shows its mean recall,
    e.g. ``25% (0.70)``."""
    base = {r["context"]: r for r in rows if r["method"] == BASELINE and "retrieval_acc" in r}

    def pct(row, key):
        return f"{100 * row[key]:.0f}%" if row is not None and key in row else "n/a"

    def cell(row, task):
        key = f"retrieval_acc_{task}"
        found = row.get(f"retrieval_recall_{task}") if task in list_tasks and key in row else None
        text = pct(row, key) + (f" ({found:.2f})" if found is not None else "")
        ref = base.get(row["context"])
        return text if row["method"] == BASELINE else f"{text} [{pct(ref, key)}]"

    body = []
    for r in rows:
        if "retrieval_acc" not in r:
            continue
        ref = base.get(r["context"])
        delta = f"{100 * (r['retrieval_acc'] - ref['retrieval_acc']):+.0f}" if ref is not None else "n/a"
        average = pct(r, "retrieval_acc") + ("" if r["method"] == BASELINE else f" [{pct(ref, 'retrieval_acc')}]")
        body.append([_label(r), str(r["context"]), *(cell(r, t) for t in tasks), average, str(r["retrieval_cases"]), delta])
    if not body:
        return ""
    text = _grid(["method", "C", *tasks, "average", "cases", "Δ pts vs none"], body)
    text += "\n[x%]: the uncompressed baseline (none) at the same context"
    shown = [t for t in tasks if t in list_tasks]
    if shown:
        text += f"\n{', '.join(shown)}: accuracy (mean recall: the fraction of a list answer's items found)"
    return text


def write_outputs(folder: Path, rows: list[dict], raw: list[dict], conditions: dict, text: str) -> dict[str, Path]:
    """Write ``results.json`` (conditions, rows, raw parts), ``results.csv`` (rows) and ``table.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "csv": folder / "results.csv", "table": folder / "table.txt"}
    payload = {"conditions": conditions, "rows": rows, "raw": raw}
    paths["json"].write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    paths["table"].write_text(text + "\n", encoding="utf-8")
    return paths
