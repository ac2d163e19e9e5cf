"""The memory/quality frontier as a PNG: compression × against perplexity Δ, retrieval accuracy and
decode speed (and, when measured, throughput under a KV memory budget, each point labelled with its
batch), a row of panels per context length.

Colour is the method's family (eviction, quantization, low-rank, sharing, combinations, the
baseline, kvpress peers) and marker shape the method's name, so a method at several ratios shares
one marker. In each quality panel a line joins the Pareto front (the points no other point beats
on both compression and quality), each labelled by its spec.

matplotlib is optional (``pip install 'kvcompress[bench]'``); :func:`require_matplotlib` fails
fast, before a benchmark runs, when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from kvcompress.bench.methods import (
    BASELINE,
    KVPRESS_PREFIX,
    PEER_PREFIX,
    QUESTION_AWARE,
)
from kvcompress.registry import parse_spec

PIP_HINT = "pip install 'kvcompress[bench]'"
FAMILY_COLOURS = {
    "baseline": "black",
    "eviction": "tab:blue",
    "quantization": "tab:orange",
    "low-rank": "tab:green",
    "sharing": "tab:purple",
    "combination": "tab:red",
    "other storage": "tab:brown",
    "kvpress": "tab:gray",
    "peer": "tab:olive",
}
# Storage methods by family; an eviction method is any Selection, a combination any spec of several.
STORAGE_FAMILIES = {"kivi": "quantization", "lowrank": "low-rank", "share_heads": "sharing", "share_layers": "sharing"}
MARKERS = "osD^vPXhp<>d8H"
PANELS = (  # (row key, y label, whether lower quality values are better; None: not a quality, no front)
    ("perplexity_delta_pct", "perplexity Δ% vs none (lower is better)", True),
    ("retrieval_acc", "retrieval accuracy % (higher is better)", False),
    ("decode_x", "decode ms/token × none (lower is faster)", None),
)
THROUGHPUT_PANEL = ("throughput_x", "tokens/s at the budget's batch × none (higher is better)", None)
PERPLEXITY_TICKS = (-50, -20, -10, -5, 0, 5, 10, 20, 50, 100, 200, 500, 1000)


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


def method_name(spec: str) -> str:
    """The method a spec configures, without its parameters: ``snapkv:ratio=0.5`` -> ``snapkv``,
    ``streaming:window=512+kivi:bits=4`` -> ``streaming+kivi``, ``kvpress:SnapKVPress:0.5`` ->
    ``kvpress:SnapKVPress``, ``peer:quanto:bits=4`` -> ``peer:quanto``."""
    for prefix in (KVPRESS_PREFIX, PEER_PREFIX):
        if spec.startswith(prefix):
            return prefix + spec[len(prefix) :].partition(":")[0]
    return "+".join(part.partition(":")[0].strip() for part in spec.removesuffix(QUESTION_AWARE).split("+"))


def family(spec: str) -> str:
    """The family a spec belongs to, one of :data:`FAMILY_COLOURS`."""
    if spec.startswith(KVPRESS_PREFIX):
        return "kvpress"
    if spec.startswith(PEER_PREFIX):
        return "peer"
    pipeline = parse_spec(spec.removesuffix(QUESTION_AWARE))
    if not pipeline.methods:
        return "baseline"
    if len(pipeline.methods) > 1:
        return "combination"
    if pipeline.selection is not None:
        return "eviction"
    return STORAGE_FAMILIES.get(pipeline.representation.name, "other storage")


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the ``(compression, quality)`` points that no other point beats (at least as much
    compression and at least as good quality, one of them strictly), in increasing compression."""
    sign = -1 if lower_is_better else 1
    front, best = [], float("-inf")
    # From the most compressed down: a point is on the front when it beats every point compressed more.
    for i in sorted(range(len(points)), key=lambda i: (-points[i][0], -sign * points[i][1])):
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front[::-1]


def plot_frontier(rows: list[dict], path: Path, title: str) -> Path:
    """Draw every row with a compression: a row of three panels (perplexity Δ%, retrieval accuracy,
    decode speed, each against compression ×) per context length, and a fourth when any row has a
    throughput (tokens/s × none's under the same KV budget, each point labelled ``b=<batch>``). A
    panel with nothing measured says so."""
    plt = require_matplotlib()

    rows = [r for r in rows if r.get("compression") is not None]
    contexts = sorted({r["context"] for r in rows}) or [None]
    families = {method_name(r["method"]): family(r["method"]) for r in rows}  # a method's family follows from its name
    names = sorted(families, key=lambda n: list(FAMILY_COLOURS).index(families[n]))  # by family, then as they come
    others = [n for n in names if n != BASELINE]
    markers = {BASELINE: "*", **{n: MARKERS[i % len(MARKERS)] for i, n in enumerate(others)}}
    styles = {n: (markers[n], FAMILY_COLOURS[families[n]]) for n in names}
    panels = PANELS + ((THROUGHPUT_PANEL,) if any(r.get("throughput_x") is not None for r in rows) else ())
    fig, axes = plt.subplots(len(contexts), len(panels), figsize=(6 * len(panels), 5.2 * len(contexts)), squeeze=False)
    for axes_row, context in zip(axes, contexts):
        for ax, panel in zip(axes_row, panels):
            _panel(ax, [r for r in rows if r["context"] == context], *panel, styles)
            ax.set_title(f"C = {context} tokens" if context is not None else "", fontsize=9)

    def handle(marker, colour, label, size=8):
        return plt.Line2D([], [], marker=marker, linestyle="", color=colour, markersize=size, label=label)

    handles = [handle(*styles[n], n, 12 if n == BASELINE else 8) for n in names]
    handles += [handle("s", FAMILY_COLOURS[f], f"family: {f}", 9) for f in FAMILY_COLOURS if f in families.values()]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", alpha=0.6, label="Pareto front (labelled by spec)"))
    columns = 6
    fig.legend(handles=handles, loc="lower center", ncol=columns, frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=9)
    legend_inches = 0.25 + 0.22 * -(-len(handles) // columns)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _panel(ax, rows: list[dict], key: str, label: str, lower_is_better: bool | None, styles: dict[str, tuple[str, str]]) -> None:
    """One panel: ``rows``' ``key`` against compression, a marker and colour per method name (``styles``);
    for a quality (``lower_is_better`` not None), the Pareto front joined and labelled."""
    from matplotlib.patheffects import withStroke
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_ylabel(label)
    ax.set_xlabel("KV cache compression × (bytes/token of none ÷ method's)")
    shown = [r for r in rows if r.get(key) is not None]
    if not shown:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    scale = 100 if key == "retrieval_acc" else 1
    for r in shown:
        marker, colour = styles[method_name(r["method"])]
        size = 260 if r["method"] == BASELINE else 60
        ax.scatter(r["compression"], scale * r[key], marker=marker, s=size, color=colour, edgecolors="white",
                   linewidths=0.5, alpha=0.9, zorder=3)
    if lower_is_better is not None:
        front = [shown[i] for i in pareto_front([(r["compression"], r[key]) for r in shown], lower_is_better)]
        ax.plot([r["compression"] for r in front], [scale * r[key] for r in front], color="black", linewidth=1,
                linestyle="--", alpha=0.6, zorder=2)
        for i, r in enumerate(front):  # labels alternately above and below, so neighbours do not overlap
            ax.annotate(r["method"].replace("+", "\n+"), (r["compression"], scale * r[key]), xytext=(5, 4 if i % 2 else -4),
                        textcoords="offset points", va="bottom" if i % 2 else "top", fontsize=6.5, zorder=4,
                        path_effects=[withStroke(linewidth=2.5, foreground="white")])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
    ax.margins(x=0.12, y=0.1)
    ax.grid(True, alpha=0.3)
    if key == "perplexity_delta_pct":  # linear within ±10%, where good methods sit; logarithmic beyond
        values = [r[key] for r in shown]
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(min(-2, 1.4 * min(values)), max(12, 1.4 * max(values)))
        ax.yaxis.set_major_locator(FixedLocator(PERPLEXITY_TICKS))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:+g}%"))
        ax.axhline(0, color="black", linewidth=0.6)
    elif key == "retrieval_acc":
        ax.set_ylim(-5, 108)
        ax.axhline(100, color="black", linewidth=0.6)
    else:
        ax.axhline(1, color="black", linewidth=0.6)
    if key == "throughput_x":
        for r in shown:
            ax.annotate(f"b={r['throughput_batch']}", (r["compression"], r[key]), xytext=(5, -4), textcoords="offset points",
                        va="top", fontsize=6.5, path_effects=[withStroke(linewidth=2.5, foreground="white")])
