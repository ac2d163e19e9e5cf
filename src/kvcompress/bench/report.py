"""Turn measured parts into rows, ratios against ``none``, one printed table, CSV and JSON.

Pure bookkeeping: no tensors, no model. A *part* is one measurement of one (method, context):
``speed`` (from :mod:`kvcompress.bench.speed`), ``perplexity`` and ``retrieval``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvcompress.bench.methods import BASELINE

COLUMNS = (
    "method",
    "C",
    "KV bytes/token",
    "compression ×",
    "perplexity (Δ% vs none)",
    "retrieval acc.",
    "prefill s (× none)",
    "decode ms/token (× none)",
    "peak memory (× none)",
)
KVPRESS_MARK = "†"
STALE_MARK = "*"


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def build_rows(results: list[dict], conditions: dict) -> list[dict]:
    """One flat row per (method, context), with every raw figure, ratios to ``none`` and the conditions.

    Args:
        results: dicts with ``spec``, ``source``, ``context``, the parts ``speed``,
            ``perplexity``, ``retrieval`` (each a dict, or None when not measured) and, optionally,
            ``stale``: what differed in the code that measured a part shown (``""``: nothing).
        conditions: model, dtype, device, threads, batch, lengths, versions: copied into every row.

    Returns:
        Rows in the order of ``results``; ``stale`` is ``""`` or what measured the row's parts.
    """
    base = {r["context"]: r for r in results if r["spec"] == BASELINE}
    rows = []
    for r in results:
        ref = base.get(r["context"], {})
        speed, ppl, ret = r.get("speed"), r.get("perplexity"), r.get("retrieval")
        ref_speed, ref_ppl = ref.get("speed"), ref.get("perplexity")
        row = {"method": r["spec"], "source": r["source"], "context": r["context"], "stale": r.get("stale", "")}
        if speed:
            row["kv_bytes"] = speed["kv_bytes_after_prefill"]
            row["kv_bytes_per_token"] = speed["kv_bytes_after_prefill"] / speed["context_tokens"]
            row["prefill_s"] = speed["prefill_s"]
            row["decode_ms_per_token"] = speed["decode_ms_per_token"]
            row["peak_memory_bytes"] = speed["peak_memory_bytes"]
            row["memory_after_load_bytes"] = speed["memory_after_load_bytes"]
            row["memory_kind"] = speed["memory_kind"]
            if ref_speed:
                ref_per_token = ref_speed["kv_bytes_after_prefill"] / ref_speed["context_tokens"]
                row["compression"] = _ratio(ref_per_token, row["kv_bytes_per_token"])
                row["prefill_x"] = _ratio(speed["prefill_s"], ref_speed["prefill_s"])
                row["decode_x"] = _ratio(speed["decode_ms_per_token"], ref_speed["decode_ms_per_token"])
                row["peak_memory_x"] = _ratio(speed["peak_memory_bytes"], ref_speed["peak_memory_bytes"])
        if ppl:
            row["perplexity"] = ppl["perplexity"]
            if ref_ppl:
                row["perplexity_delta_pct"] = 100 * (ppl["perplexity"] / ref_ppl["perplexity"] - 1)
        if ret:
            row["retrieval_correct"] = ret["correct"]
            row["retrieval_cases"] = ret["cases"]
            row["retrieval_acc"] = ret["correct"] / ret["cases"]
            # Parts stored before task sets named the counts by_form (read with --reuse-stale).
            for task, (correct, total) in ret.get("by_task", ret.get("by_form", {})).items():
                row[f"retrieval_acc_{task}"] = correct / total
            for task, found in ret.get("recall_by_task", {}).items():
                row[f"retrieval_recall_{task}"] = found
        row.update(conditions)
        rows.append(row)
    return rows


def _fmt_x(x: float | None) -> str:
    return f" ({x:.2f}×)" if x is not None else ""


def _label(row: dict) -> str:
    """The method, marked when stale and when kvpress compressed it (the table's footnotes say so)."""
    return row["method"] + (STALE_MARK if row["stale"] else "") + (f" {KVPRESS_MARK}" if row["source"] == "kvpress" else "")


def _cells(row: dict) -> list[str]:
    missing = "n/a"
    cells = [_label(row), str(row["context"])]
    if "kv_bytes_per_token" in row:
        cells.append(f"{row['kv_bytes_per_token']:,.0f}")
        cells.append(f"{row['compression']:.2f}×" if row.get("compression") else missing)
    else:
        cells += [missing, missing]
    if "perplexity" in row:
        delta = row.get("perplexity_delta_pct")
        cells.append(f"{row['perplexity']:.3f}" + (f" ({delta:+.1f}%)" if delta is not None else ""))
    else:
        cells.append(missing)
    if "retrieval_acc" in row:
        cells.append(f"{100 * row['retrieval_acc']:.0f}% ({row['retrieval_correct']}/{row['retrieval_cases']})")
    else:
        cells.append(missing)
    if "prefill_s" in row:
        cells.append(f"{row['prefill_s']:.2f}" + _fmt_x(row.get("prefill_x")))
        cells.append(f"{row['decode_ms_per_token']:.1f}" + _fmt_x(row.get("decode_x")))
        cells.append(f"{row['peak_memory_bytes'] / 2**20:,.0f} MiB" + _fmt_x(row.get("peak_memory_x")))
    else:
        cells += [missing] * 3
    return cells


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    def line(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, body)])


def format_table(rows: list[dict]) -> str:
    """The main table: a row per method and context, in the order given."""
    text = _grid(list(COLUMNS), [_cells(r) for r in rows])
    stale = dict.fromkeys(r["stale"] for r in rows if r["stale"])
    if stale:
        text += f"\n{STALE_MARK} measured by other code: {'; '.join(stale)}"
    if any(r["source"] == "kvpress" for r in rows):
        text += f"\n{KVPRESS_MARK} compressed by NVIDIA kvpress through its press hooks, not by kvcompress"
    return text


def format_retrieval(rows: list[dict], tasks: tuple[str, ...], list_tasks: tuple[str, ...] = ()) -> str:
    """Retrieval accuracy per task, and over all tasks: a row per method and context, ``none`` first at
    each context. A task of ``list_tasks`` also shows its mean recall, e.g. ``25% (0.70)``."""

    def cell(row, task):
        if f"retrieval_acc_{task}" not in row:
            return "n/a"
        found = row.get(f"retrieval_recall_{task}") if task in list_tasks else None
        return f"{100 * row[f'retrieval_acc_{task}']:.0f}%" + (f" ({found:.2f})" if found is not None else "")

    body = [[_label(r), str(r["context"]), *(cell(r, t) for t in tasks), f"{100 * r['retrieval_acc']:.0f}%"]
            for r in rows if "retrieval_acc" in r]
    if not body:
        return ""
    text = _grid(["method", "C", *tasks, "all"], body)
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
