"""The memory/quality frontier as a PNG: compression × against perplexity Δ and retrieval accuracy.

matplotlib is optional (``pip install 'kvcompress[bench]'``); :func:`require_matplotlib` fails
fast, before a benchmark runs, when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from kvcompress.bench.methods import BASELINE

PIP_HINT = "pip install 'kvcompress[bench]'"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib():
    """Import matplotlib with a file-only backend, or raise :class:`PlotUnavailable` naming the pip command."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed: {PIP_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: list[dict], path: Path, title: str) -> Path:
    """Draw one point per (method, context): compression × on x, perplexity Δ% and retrieval accuracy on y.

    The ``none`` baseline is a black star; kvpress rows are hollow; one colour per context length.
    """
    plt = require_matplotlib()
    contexts = sorted({r["context"] for r in rows})
    colours = dict(zip(contexts, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    panels = (("perplexity_delta_pct", "perplexity Δ% vs none (lower is better)"), ("retrieval_acc", "retrieval accuracy"))
    from matplotlib.ticker import FuncFormatter

    for ax, (key, label) in zip(axes, panels):
        labelled_baseline = False
        for r in rows:
            if r.get("compression") is None or r.get(key) is None:
                continue
            y = 100 * r[key] if key == "retrieval_acc" else r[key]
            baseline = r["method"] == BASELINE
            ax.scatter(
                r["compression"],
                y,
                marker="*" if baseline else "o",
                s=220 if baseline else 60,
                color="black" if baseline else colours[r["context"]],
                facecolors="none" if r["source"] == "kvpress" else None,
                zorder=3,
            )
            if baseline and labelled_baseline:
                continue
            labelled_baseline |= baseline
            ax.annotate(
                f"{r['method']}" + (" (baseline)" if baseline else ""),
                (r["compression"], y),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.margins(x=0.2)
        ax.set_xlabel("KV cache compression × (bytes/token of none ÷ method's)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if key == "retrieval_acc":
            ax.set_ylim(-5, 105)
        else:
            ax.axhline(0, color="black", linewidth=0.8)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], label=f"C = {c}") for c in contexts]
    handles.append(plt.Line2D([], [], marker="*", linestyle="", color="black", markersize=12, label="none (baseline)"))
    if any(r["source"] == "kvpress" for r in rows):
        handles.append(plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="gray", label="kvpress"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
