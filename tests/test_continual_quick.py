"""benchmarks/continual.py end to end: a CI-sized run, and the full --quick mode (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "continual.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("continual_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_result(result: dict, methods: list[str], n_requests: int) -> None:
    assert result["requests"] == ["circle", "red", "striped"][:n_requests]
    assert len(result["base"]["requests"]) == n_requests
    assert set(result["methods"]) == set(methods)
    for name in methods:
        entry = result["methods"][name]
        assert "error" not in entry, entry.get("error")
        assert [r["index"] for r in entry["requests"]] == list(range(1, n_requests + 1))
        for row in entry["requests"]:
            for key in ("UA", "IRA", "CRA", "H"):
                assert row[key] is None or 0.0 <= row[key] <= 1.0
            assert row["distance"] >= 0.0
            assert row["seconds"] >= 0.0 and row["peak_memory_mb"] > 0
        assert set(entry["final"]) >= {"UA", "IRA", "CRA", "H", "distance"}
        assert len(entry["seconds_per_request"]) == n_requests
        assert entry["peak_memory_mb"] > 0
        if name == "uce":
            assert entry["seconds_per_step"] is None  # closed form: no training steps
        else:
            assert entry["seconds_per_step"] > 0


def test_benchmark_ci_run_writes_json_table_and_same_seeds_for_every_method(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _benchmark()
    methods = ["duge", "ca", "uce"]
    code = bench.main(["--quick", "--requests", "1", "--steps", "2", "--methods", ",".join(methods),
                       "--out", str(tmp_path), "--threads", "1"])
    assert code == 0
    result = json.loads((tmp_path / "continual.json").read_text())
    _check_result(result, methods, 1)
    for name in methods:  # the same evaluation images' seeds and settings for every method
        assert result["methods"][name]["config"]["seed"] == 0
    assert (tmp_path / "erosion.png").stat().st_size > 0 and (tmp_path / "cost.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "unedited" in table and all(name in table for name in methods)


def test_benchmark_refuses_an_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        _benchmark().main(["--methods", "duge,magic", "--out", str(tmp_path)])


@pytest.mark.slow
def test_quick_mode_runs_every_method_on_three_requests(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _benchmark()
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "continual.json").read_text())
    _check_result(result, list(bench.METHODS), 3)


def test_report_of_a_benchmark_folder_embeds_the_plots_and_the_table(tmp_path):
    from duge.report import write_report

    result = {"model": "builtin", "concept_set": "sequence10", "requests": ["circle", "red"], "setting": "sequential",
              "base": {"requests": [{"UA": 0.1, "IRA": 0.9, "CRA": 0.95, "H": 0.2}] * 2, "distance_floor": 0.5},
              "methods": {"duge": {"requests": [{"UA": 1.0, "IRA": 0.9, "CRA": 0.9, "distance": 1.0},
                                                {"UA": 0.9, "IRA": 0.8, "CRA": 0.85, "distance": 2.0}],
                                   "final": {"UA": 0.9, "IRA": 0.8, "CRA": 0.85, "H": 0.849, "distance": 2.0},
                                   "mean_seconds_per_request": 12.0, "seconds_per_step": 0.1, "peak_memory_mb": 600},
                          "esd-x": {"error": "TrainingDiverged: loss became nan"}}}
    (tmp_path / "continual.json").write_text(json.dumps(result))
    (tmp_path / "erosion.png").write_bytes(_PNG)
    html = write_report(tmp_path).read_text()
    assert "data:image/png;base64," in html and "<svg" in html
    assert "0.849" in html and "TrainingDiverged" in html


def test_report_of_an_unlearn_folder_has_requests_final_metrics_grid_and_manifest(tmp_path):
    from duge.report import write_report

    report = {"model": "builtin", "concept_set": "demo", "method": "duge", "setting": "sequential",
              "config": {"steps": 150}, "seconds_total": 42.0, "peak_memory_mb": 700.0,
              "before": {"UA": 0.05, "IRA": 0.9, "CRA": 0.92},
              "requests": [{"target": "circle", "seconds": 20.0, "steps": 150, "UA": 0.97, "IRA": 0.88, "CRA": 0.9,
                            "details": {"H": 0.916}},
                           {"target": "red <b>", "seconds": 21.0, "steps": 150, "UA": 0.95, "IRA": 0.86, "CRA": 0.89}],
              "final": {"UA": 0.95, "IRA": 0.86, "CRA": 0.89, "IRA_ratio": 0.955}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "before_after.png").write_bytes(_PNG)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "duge_manifest.json").write_text(json.dumps(
        {"method": "duge", "version": "0.1.0", "base_model": "builtin", "base_model_hash": "abc123",
         "requests": [{"target": "circle", "anchor": "shape", "preserve": ["square"], "settings": {"steps": 150}}]}))
    html = write_report(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 1
    assert "0.916" in html and "0.955" in html and "unedited model" in html
    assert "abc123" in html and "square" in html
    assert "red &lt;b&gt;" in html  # user text is escaped


def test_report_refuses_a_folder_without_a_report(tmp_path):
    from duge.errors import DugeError
    from duge.report import write_report

    with pytest.raises(DugeError, match="no report.json"):
        write_report(tmp_path)


# A 1×1 PNG.
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
    "0000050001e226059b0000000049454e44ae426082"
)


def test_runs_split_by_method_merge_into_one_result_only_when_their_settings_match():
    bench = _benchmark()
    common = {"model": "builtin", "concept_set": "sequence10", "requests": ["circle"], "setting": "sequential",
              "seed": 0, "profile": {"steps": 2}, "evaluation": {"steps": 8}, "base": {"requests": []}}
    a = dict(common, methods={"duge": {"final": {"UA": 1.0}}}, complete=True, seconds_total=10.0)
    b = dict(common, methods={"uce": {"final": {"UA": 0.5}}}, complete=True, seconds_total=30.0)
    merged = bench.merge_results([a, b])
    assert set(merged["methods"]) == {"duge", "uce"} and merged["complete"] and merged["seconds_total"] == 30.0
    with pytest.raises(SystemExit, match="evaluation"):
        bench.merge_results([a, dict(b, evaluation={"steps": 20})])
