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


MARKERS = "osD^vPXh<>pd"


def plot_frontier(rows: list[dict], path: Path, title: str) -> Path:
    """Draw one point per (method, context): compression × on x, perplexity Δ% and retrieval accuracy on y.

    Colour is the context length, marker shape the method (named in the legend rather than next to
    the points, whose labels would overlap); the ``none`` baseline is a large star with a black
    edge; kvpress rows are hollow.
    """
    plt = require_matplotlib()
    from matplotlib.ticker import FuncFormatter

    contexts = sorted({r["context"] for r in rows})
    colours = dict(zip(contexts, plt.get_cmap("tab10").colors))
    others = [m for m in dict.fromkeys(r["method"] for r in rows) if m != BASELINE]
    markers = {BASELINE: "*", **{m: MARKERS[i % len(MARKERS)] for i, m in enumerate(others)}}
    kvpress = {r["method"] for r in rows if r["source"] == "kvpress"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    panels = (("perplexity_delta_pct", "perplexity Δ% vs none (lower is better)"), ("retrieval_acc", "retrieval accuracy %"))
    for ax, (key, label) in zip(axes, panels):
        for r in rows:
            if r.get("compression") is None or r.get(key) is None:
                continue
            baseline = r["method"] == BASELINE
            colour = colours[r["context"]]
            ax.scatter(
                r["compression"],
                100 * r[key] if key == "retrieval_acc" else r[key],
                marker=markers[r["method"]],
                s=320 if baseline else 70,
                facecolors="none" if r["method"] in kvpress else colour,
                edgecolors="black" if baseline else colour,
                linewidths=1.2,
                alpha=0.85,
                zorder=3,
            )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.margins(x=0.1)
        ax.set_xlabel("KV cache compression × (bytes/token of none ÷ method's)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if key == "retrieval_acc":
            ax.set_ylim(-5, 105)
        else:
            ax.axhline(0, color="black", linewidth=0.8)

    def handle(marker, label, colour="gray", hollow=False, size=8):
        face = "none" if hollow else colour
        return plt.Line2D([], [], marker=marker, linestyle="", color=colour, markerfacecolor=face, markersize=size, label=label)

    handles = [handle("*", "none (baseline)", "black", size=13)]
    handles += [handle(markers[m], m + (" (kvpress)" if m in kvpress else ""), hollow=m in kvpress) for m in others]
    handles += [handle("s", f"C = {c} tokens", colours[c]) for c in contexts]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=9)
    rows_of_legend = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * rows_of_legend, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
