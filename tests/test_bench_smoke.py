"""``kvcompress bench --quick`` end to end on the default model (about 3 minutes on 2 CPU cores)."""

from __future__ import annotations

import csv
import json

from kvcompress.bench import runner
from kvcompress.bench.cli import QUICK
from kvcompress.cli import main


def test_quick_bench_writes_table_csv_json_and_plot_then_reuses(tmp_path, capsys, monkeypatch):
    assert main(["bench", "--quick", "--plot", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    methods = QUICK["methods"].split(",")
    table = out[out.index("method "):]
    for method in methods:
        assert any(line.startswith(method + " ") for line in table.splitlines())
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert [r["method"] for r in rows] == methods
    payload = json.loads((folder / "results.json").read_text())
    assert payload["conditions"]["model"] == "smollm2-135m" and payload["conditions"]["batch"] == 1
    none, streaming, kivi = payload["rows"]
    assert none["compression"] == 1.0 and none["perplexity_delta_pct"] == 0.0
    assert streaming["compression"] > 3 and kivi["compression"] > 3  # 1024 tokens into 260 slots / 2-bit codes
    assert none["retrieval_cases"] == 3 and 0 <= kivi["retrieval_acc"] <= 1
    assert none["peak_memory_bytes"] > none["memory_after_load_bytes"] > 0
    assert (folder / "frontier.png").stat().st_size > 10_000

    def refuse(*args, **kwargs):
        raise AssertionError("a stored result was measured again")

    monkeypatch.setattr(runner, "measure_in_subprocess", refuse)
    monkeypatch.setattr(runner, "perplexity", refuse)
    monkeypatch.setattr(runner, "run_retrieval", refuse)
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("\n") > len(methods)
