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
