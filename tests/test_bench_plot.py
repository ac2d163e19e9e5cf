"""The frontier plot: families, method names, the Pareto front, and a PNG with or without speed figures."""

from __future__ import annotations

import pytest

from kvcompress.bench import report
from kvcompress.bench.plot import family, method_name, pareto_front, plot_frontier

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "spec, name, kind",
    [
        ("none", "none", "baseline"),
        ("snapkv:ratio=0.5", "snapkv", "eviction"),
        ("snapkv:ratio=0.75@question-aware", "snapkv", "eviction"),
        ("kivi:bits=2,group=32", "kivi", "quantization"),
        ("lowrank:key_ratio=0.75,value_ratio=0.25", "lowrank", "low-rank"),
        ("share_heads:groups=2", "share_heads", "sharing"),
        ("share_layers:start=0.5", "share_layers", "sharing"),
        ("streaming:sink=4,window=512+kivi:bits=4", "streaming+kivi", "combination"),
        ("kvpress:SnapKVPress:0.5", "kvpress:SnapKVPress", "kvpress"),
    ],
)
def test_a_spec_has_a_method_name_and_a_family(spec, name, kind):
    assert method_name(spec) == name and family(spec) == kind


def test_pareto_front_keeps_the_points_nothing_beats():
    # (compression, perplexity Δ%): lower is better.
    points = [(1.0, 0.0), (2.0, 5.0), (2.0, 3.0), (4.0, 3.0), (4.0, 10.0), (8.0, 20.0), (3.0, -1.0)]
    assert pareto_front(points, lower_is_better=True) == [6, 3, 5]  # (3, -1) beats (1, 0); (4, 3) beats both at 2
    # (compression, accuracy): higher is better; a tie in quality goes to the more compressed point.
    points = [(1.0, 0.9), (4.0, 0.9), (8.0, 0.3), (8.0, 0.1), (16.0, 0.0)]
    assert pareto_front(points, lower_is_better=False) == [1, 2, 4]


def _results(with_speed: bool) -> list[dict]:
    specs = ["none", "snapkv:ratio=0.5", "snapkv:ratio=0.75", "kivi:bits=4", "snapkv:ratio=0.5+kivi:bits=4",
             "kvpress:SnapKVPress:0.5", "snapkv:ratio=0.75@question-aware"]
    results = []
    for i, spec in enumerate(specs):
        speed = {"prefill_s": 1.0, "decode_ms_per_token": 10.0 + i, "context_tokens": 1024,
                 "kv_bytes_after_prefill": 46080 * 1024 // (1 + i), "peak_memory_bytes": 2**30,
                 "memory_after_load_bytes": 2**29, "memory_kind": "rss"}
        aware = spec.endswith("@question-aware")
        results.append({
            "spec": spec, "source": "kvpress" if spec.startswith("kvpress:") else "kvcompress", "context": 1024,
            "speed": speed if with_speed and not aware else None,
            "perplexity": None if aware else {"perplexity": 10.0 + i},
            "retrieval": {"correct": 3 - i % 4, "cases": 3, "by_task": {"passkey": [3 - i % 4, 3]}},
        })
    return results


@pytest.mark.parametrize("with_speed", [True, False])
def test_plot_writes_a_png(tmp_path, with_speed):
    pytest.importorskip("matplotlib")
    rows = report.build_rows(_results(with_speed), {"model": "m"})
    assert ("decode_x" in rows[1]) == with_speed
    path = plot_frontier(rows, tmp_path / "plots" / "frontier.png", "title")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_throughput_adds_a_panel(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    results = _results(True)
    for i, r in enumerate(results):
        r["throughput"] = {"budget_bytes": 4 * 2**20, "bytes_per_sequence": 2**20 // (1 + i), "batch": 4 * (1 + i),
                           "cache_bytes": 4 * 2**20, "tokens_per_s": 100.0 * (1 + i) ** 0.5}
    rows = report.build_rows(results, {"model": "m"})
    shown = []
    original = plt.subplots
    plt.subplots = lambda *args, **kwargs: shown.append(args) or original(*args, **kwargs)
    try:
        plot_frontier(rows, tmp_path / "frontier.png", "title")
    finally:
        plt.subplots = original
    assert shown == [(1, 4)] and rows[1]["throughput_x"] == pytest.approx(2**0.5)
