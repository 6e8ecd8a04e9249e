"""benchmarks/continual.py end to end: a CI-sized run, and the full --quick mode (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "continual.py"

from duge.methods import METHODS as METHOD_TABLE  # noqa: E402


def _benchmark():
    spec = importlib.util.spec_from_file_location("continual_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_result(result: dict, methods: list[str], n_requests: int, seeds=("0",)) -> None:
    assert result["requests"] == ["circle", "red", "striped"][:n_requests]
    assert len(result["base"]["requests"]) == n_requests and result["base"]["final"]["UA"] is not None
    assert set(result["methods"]) == set(methods) == set(result["runs"])
    for name in methods:
        assert sorted(result["runs"][name]) == sorted(seeds)
        for seed, run in result["runs"][name].items():
            assert "error" not in run, run.get("error")
            assert run["config"]["seed"] == int(seed) and run["git_commit"]
            assert [r["index"] for r in run["requests"]] == list(range(1, n_requests + 1))
            for row in run["requests"]:
                for key in ("UA", "IRA", "CRA", "H", "compositional"):
                    assert row[key] is None or 0.0 <= row[key] <= 1.0
                assert row["distance"] is not None and row["seconds"] >= 0.0 and row["peak_memory_mb"] > 0
            # the last measurement is the final size, the others the curve's
            assert run["requests"][-1]["measure_size"] == result["evaluation"]["final"]
        entry = result["methods"][name]
        assert set(entry["final"]) >= {"UA", "IRA", "CRA", "H", "compositional", "distance"}
        assert entry["seeds"] == sorted(seeds, key=int) and len(entry["requests"]) == n_requests
        if METHOD_TABLE[name].objective == "closed_form":
            assert entry["seconds_per_step"] is None  # closed form: no training steps
        else:
            assert entry["seconds_per_step"] > 0


def test_benchmark_ci_run_writes_json_table_and_same_seeds_for_every_method(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _benchmark()
    methods = ["duge", "ca", "uce"]
    code = bench.main(["--quick", "--requests", "1", "--steps", "2", "--methods", ",".join(methods),
                       "--out", str(tmp_path / "run"), "--threads", "1"])
    assert code == 0
    result = json.loads((tmp_path / "run" / "continual.json").read_text())
    _check_result(result, methods, 1)
    assert result["methods"]["ca"]["config"]["learning_rate"] == METHOD_TABLE["ca"].defaults["learning_rate"]
    assert result["methods"]["ca"]["config"]["replay_batch_size"] == 0  # a baseline runs without DUGE's replay
    assert (tmp_path / "run" / "erosion.png").stat().st_size > 0 and (tmp_path / "run" / "cost.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "unedited" in table and all(f"| {name} |" in table for name in methods)
    assert (tmp_path / "run" / "continual_table.md").read_text().strip() in table
    # a second part reads the unedited model's measurement from the cache instead of measuring again
    assert bench.main(["--quick", "--requests", "1", "--steps", "2", "--methods", "uce", "--seeds", "1",
                       "--out", str(tmp_path / "part"), "--threads", "1", "--no-plots"]) == 0
    assert "read from" in capsys.readouterr().out
    part = json.loads((tmp_path / "part" / "continual.json").read_text())
    assert part["base"] == result["base"]
    merged = bench.merge_results([result, part])
    assert merged["methods"]["uce"]["seeds"] == ["0", "1"] and merged["seeds"] == [0, 1]
    assert merged["methods"]["uce"]["final_ci95"]["IRA"] is not None  # two seeds: a t-interval


def test_method_tuning_sequences_load_from_benchmarks_tuning_and_are_never_reported():
    bench = _benchmark()
    assert "method_tuning10" in bench.METHOD_TUNING_SEQUENCES
    assert not set(bench.METHOD_TUNING_SEQUENCES) & set(bench.REPORTED_SEQUENCES)
    concept_set = bench._load_sequence("method_tuning10", bench.FULL)
    reported = {r.target for name in bench.REPORTED_SEQUENCES for r in bench._load_sequence(name, bench.FULL).requests}
    targets = [r.target for r in concept_set.requests]
    assert len(targets) == 10 and targets != [r.target for r in bench._load_sequence("sequence10", bench.FULL).requests]
    assert set(targets) - reported  # it erases concepts no reported sequence erases (heart, diamond, ...)


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


def test_confidence_intervals_use_the_t_distribution_over_seeds():
    bench = _benchmark()
    mean, half, n = bench.mean_ci([0.8, 0.9, 1.0])
    assert (mean, n) == (pytest.approx(0.9), 3) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert bench.mean_ci([0.5]) == (0.5, None, 1) and bench.mean_ci([None]) == (None, None, 0)
    assert bench.t95(1) == 12.706 and bench.t95(100) == 1.96
    # paired over seeds: a constant gap is significant with three seeds, a noisy one is not
    d = bench.paired_difference({"0": 0.9, "1": 0.8, "2": 0.85}, {"0": 0.8, "1": 0.7, "2": 0.75})
    assert d["mean"] == pytest.approx(0.1) and d["significant"]
    d = bench.paired_difference({"0": 0.9, "1": 0.6, "2": 0.85}, {"0": 0.8, "1": 0.8, "2": 0.75})
    assert not d["significant"] and d["n"] == 3


def test_tuning_chooses_the_highest_final_h_and_says_why():
    bench = _benchmark()
    runs = {"esd-x": [{"settings": {"learning_rate": 1e-5, "steps": 1000}, "final": {"H": 0.5}, "total_seconds": 10},
                      {"settings": {"learning_rate": 1e-4, "steps": 1000}, "final": {"H": 0.7}, "total_seconds": 10},
                      {"settings": {"learning_rate": 1e-3, "steps": 1000}, "error": "TrainingDiverged: nan"},
                      {"settings": {"learning_rate": 1e-4, "steps": 500}, "final": {"H": 0.7}, "total_seconds": 5}],
            "uce": [{"settings": {"uce_lambda": 0.5}, "error": "x"}]}
    chosen = bench.choose(runs)
    assert chosen["esd-x"]["settings"] == {"learning_rate": 1e-4, "steps": 500}  # a tie goes to the cheaper run
    assert "lr 0.001 steps 1000: H — (failed)" in chosen["esd-x"]["why"]
    assert chosen["uce"]["settings"] is None and "failed" in chosen["uce"]["why"]


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


def test_parts_merge_into_one_result_only_when_their_settings_match():
    bench = _benchmark()
    common = {"benchmark": "continual", "model": "builtin", "sequence": "sequence10", "requests": ["circle"],
              "setting": "sequential", "profile": {"steps": 2}, "evaluation": {"steps": 8},
              "base": {"requests": []}}
    run = lambda ua: {"requests": [{"index": 1, "target": "circle", "UA": ua}], "final": {"UA": ua}}  # noqa: E731
    a = dict(common, runs={"duge": {"0": run(1.0)}}, complete=True, seconds_total=10.0)
    b = dict(common, runs={"duge": {"1": run(0.8)}, "uce": {"0": run(0.5)}}, complete=True, seconds_total=30.0)
    merged = bench.merge_results([a, b])
    assert set(merged["methods"]) == {"duge", "uce"} and merged["complete"] and merged["seconds_total"] == 30.0
    assert merged["methods"]["duge"]["final"]["UA"] == pytest.approx(0.9) and merged["methods"]["duge"]["seeds"] == ["0", "1"]
    with pytest.raises(SystemExit, match="evaluation"):
        bench.merge_results([a, dict(b, evaluation={"steps": 20})])
    # A merged result merges again (its git_commit is then a list of the parts' commits).
    c = dict(common, runs={"uce": {"1": run(0.7)}}, complete=True, seconds_total=5.0, git_commit="abc")
    again = bench.merge_results([dict(merged, git_commit=["abc", "def"]), c])
    assert again["git_commit"] == ["abc", "def"] and again["methods"]["uce"]["seeds"] == ["0", "1"]


def test_summary_gives_mean_h_over_requests_and_paired_differences_to_duge():
    bench = _benchmark()

    def run(hs, ua):
        return {"requests": [{"index": k + 1, "target": t, "H": h} for k, (t, h) in enumerate(zip(["circle", "red"], hs))],
                "final": {"H": hs[-1], "UA": ua, "distance": 0.01}}

    result = {"benchmark": "continual", "sequence": "demo", "requests": ["circle", "red"],
              "base": {"requests": [], "final": {"UA": 0.0}},
              "runs": {"duge": {"0": run([0.9, 0.8], 0.9), "1": run([0.8, 0.8], 0.9), "2": run([1.0, 0.8], 0.9)},
                       "uce": {"0": run([0.6, 0.7], 0.5), "1": run([0.6, 0.7], 0.6), "2": run([0.6, 0.7], 0.7)}}}
    bench.summarize(result)
    duge = result["methods"]["duge"]
    assert duge["mean_H_over_requests"] == pytest.approx(0.85)  # seeds 0.85, 0.80, 0.90
    assert duge["mean_H_over_requests_ci95"] == pytest.approx(4.303 * 0.05 / 3 ** 0.5)
    diff = result["significance_vs_duge"]["uce"]
    assert diff["mean_H_over_requests"]["mean"] == pytest.approx(0.65 - 0.85)
    assert diff["H"]["mean"] == pytest.approx(-0.1) and diff["H"]["significant"]  # the same gap at every seed
    assert diff["UA"]["mean"] == pytest.approx(-0.3) and diff["distance"]["mean"] == pytest.approx(0.0)
    table = bench.format_table(result)
    assert "| uce | -0.100 ± 0.000 * (n 3) | -0.300 ± 0.248 * (n 3) |" in table
    # A closed form's one run stands for every seed it is paired with (it draws nothing random) ...
    del result["runs"]["uce"]["1"], result["runs"]["uce"]["2"]
    bench.summarize(result)
    diff = result["significance_vs_duge"]["uce"]
    assert diff["H"]["n"] == 3 and diff["H"]["mean"] == pytest.approx(-0.1) and diff["UA"]["mean"] == pytest.approx(-0.4)
    assert "| uce | 1 (any seed) |" in bench.format_table(result)
    # ... a trained method's does not: one seed of CA is paired with DUGE's seed 0 only.
    result["runs"]["ca"] = {"0": run([0.6, 0.7], 0.5)}
    bench.summarize(result)
    assert result["significance_vs_duge"]["ca"]["H"]["n"] == 1
    # A run with a request left unmeasured has no mean over the requests.
    assert bench.mean_h_over_requests({"requests": [{"H": 0.5}, {"H": None}]}) is None


def test_tuning_resume_takes_finished_runs_and_trains_only_the_missing_ones(monkeypatch):
    from types import SimpleNamespace

    bench = _benchmark()
    trained = []

    def fake_run_method(config, *args, **kwargs):  # the final H grows with the learning rate; a step costs 1 s
        trained.append((config.method, config.learning_rate, config.steps))
        return {"final": {"H": min(1.0, config.learning_rate * 100)}, "git_commit": "new", "total_seconds": config.steps}

    monkeypatch.setattr(bench, "prepare", lambda *a, **k: (None, SimpleNamespace(requests=[]),
                                                            SimpleNamespace(settings=bench.TUNING), {"requests": []}))
    monkeypatch.setattr(bench, "run_method", fake_run_method)
    start = bench.METHOD_TABLE["ft-l2sp"].tuning_start
    lr, steps = start["learning_rate"], start["steps"]
    done = {"ft-l2sp": [{"settings": {"learning_rate": lr, "steps": steps}, "final": {"H": 0.123}, "git_commit": "old"},
                        {"settings": {"learning_rate": lr * 10, "steps": steps}, "error": "killed"}]}
    out = bench.run_tuning(["ft-l2sp"], done=done)
    runs = out["runs"]["ft-l2sp"]
    # the finished run is taken with its own numbers and commit; the failed one and the rest are trained,
    # and the half-steps run uses the best learning rate over both (lr·10: H 1.0 before lr·100's tie)
    assert runs[0] == done["ft-l2sp"][0] and runs[1]["git_commit"] == "new"
    assert trained == [("ft-l2sp", lr * 10, steps), ("ft-l2sp", lr * 100, steps), ("ft-l2sp", lr * 10, steps // 2)]
    assert len(runs) == 4 and out["complete"] and out["chosen"]["ft-l2sp"]["settings"] == {"learning_rate": lr * 10,
                                                                                           "steps": steps // 2}


def test_a_closed_form_runs_once_for_all_training_seeds_and_a_trained_method_at_each(monkeypatch):
    from types import SimpleNamespace

    bench = _benchmark()
    trained = []

    def fake_run_method(config, *args, **kwargs):
        trained.append((config.method, config.seed))
        return {"requests": [{"index": 1, "target": "circle", "H": 0.5}], "final": {"H": 0.5}, "config": {}}

    monkeypatch.setattr(bench, "prepare", lambda *a, **k: (SimpleNamespace(device="cpu"), SimpleNamespace(requests=[]),
                                                            SimpleNamespace(settings=bench.TUNING), {"requests": []}))
    monkeypatch.setattr(bench, "run_method", fake_run_method)
    out = bench.run_benchmark(["uce", "ca"], [0, 1, 2], log=lambda *_: None)
    assert trained == [("uce", 0), ("ca", 0), ("ca", 1), ("ca", 2)]
    assert sorted(out["runs"]["uce"]) == ["0"] and sorted(out["runs"]["ca"]) == ["0", "1", "2"]


def _without_attacks(result: dict) -> dict:
    """`result` as a run without --attack writes it (what the benchmark's JSON held before attacks existed)."""
    stripped = json.loads(json.dumps(result))
    stripped.pop("attack", None)
    for runs in stripped["runs"].values():
        for entry in runs.values():
            entry.pop("attack", None)
    stripped.pop("methods", None)
    return stripped


def test_benchmark_attacks_each_runs_last_model_and_attaches_attacks_to_saved_edits_alike(tmp_path, capsys, builtin_pipe):
    from dataclasses import asdict

    from duge.errors import ModelLoadError

    bench = _benchmark()
    run = tmp_path / "run"
    assert bench.main(["--quick", "--requests", "1", "--steps", "2", "--methods", "uce", "--out", str(run),
                       "--threads", "1", "--no-plots", "--attack", "both", "--save-deltas"]) == 0
    result = json.loads((run / "continual.json").read_text())
    section = result["attack"]
    assert section["config"] == asdict(bench.attack_config("both", quick=True)) and section["concepts"] == ["circle"]
    assert set(section["sanity"]["shown"]) == {"prompt", "inversion"} and section["sanity"]["needs"] == 0.9
    assert section["sanity"]["met"] == all(v >= 0.9 for v in section["sanity"]["shown"].values())
    attack = result["runs"]["uce"]["0"]["attack"]
    (circle,) = attack["concepts"]
    assert [a["attack"] for a in circle["attacks"]] == ["prompt", "inversion"]
    assert all(a["unet_passes"] <= section["config"]["budget"] for a in circle["attacks"])
    assert attack["post_attack_UA"] == min([circle["ua_plain"]] + [a["ua"] for a in circle["attacks"]])
    assert result["methods"]["uce"]["attack"]["post_attack_UA"] == attack["post_attack_UA"]
    table = capsys.readouterr().out
    assert "| unedited (sanity) |" in table and "post-attack UA" in table and "sanity:" in table

    # The same run without attacks (as the benchmark wrote it before), attacked afterwards from its saved edit:
    # the same numbers as attacking in the run's process; the unedited model's row comes from the cache.
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(_without_attacks(result)))
    assert "post-attack" not in bench.format_table(bench.summarize(_without_attacks(result)))
    assert bench.main(["--attach", str(plain), "--deltas", str(run / "deltas"), "--attack", "both", "--quick",
                       "--out", str(tmp_path / "attached"), "--no-plots"]) == 0
    assert "sanity row read from" in capsys.readouterr().out
    attached = json.loads((tmp_path / "attached" / "continual.json").read_text())
    assert attached["attack"]["sanity"] == section["sanity"]
    later = attached["runs"]["uce"]["0"]["attack"]
    assert later["post_attack_UA"] == attack["post_attack_UA"]
    assert later["git_commit"] == bench.git_commit()  # the attack's own code, which an attach can change
    assert [a["prompt"] for a in later["concepts"][0]["attacks"]] == [a["prompt"] for a in circle["attacks"]]

    # Parts without attacks (an older run) merge with attacked ones and keep their attacks, in either order.
    other = _without_attacks(result)
    other["runs"] = {"uce": {"1": dict(result["runs"]["uce"]["0"], config=dict(result["runs"]["uce"]["0"]["config"],
                                                                                seed=1))}}
    other["runs"]["uce"]["1"].pop("attack")
    for parts in ([other, attached], [attached, other]):
        merged = bench.merge_results(parts)
        assert merged["attack"] == attached["attack"] and merged["methods"]["uce"]["attack"]["seeds"] == ["0"]
        assert merged["methods"]["uce"]["seeds"] == ["0", "1"]
    with pytest.raises(SystemExit, match="attacks differ"):
        bench.merge_results([attached, dict(attached, attack=dict(attached["attack"], config={"budget": 1}))])

    # A saved edit is read checked: another run's edit is refused.
    from duge.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(builtin_pipe, dtype="float32")
    with pytest.raises(ModelLoadError, match="not the final edit of duge seed 0"):
        bench.load_final_delta(run / "deltas" / "uce_seed0.safetensors", backend, result, "duge", 0)
    assert bench.load_final_delta(run / "deltas" / "uce_seed0.safetensors", backend, result, "uce", 0)


def test_attach_finds_the_sequence_of_a_method_tuning_run():
    # --attach reads the run's sequence by name; a method-tuning sequence lives in benchmarks/tuning/, not
    # among the shipped concept sets (it raised ConceptSetError before).
    bench = _benchmark()
    assert bench.sequence_path("method_tuning10") == bench.METHOD_TUNING_DIR / "method_tuning10.yaml"
    assert bench.sequence_path("method_tuning10").is_file()
    assert bench.sequence_path("sequence10").name == "sequence10.yaml" and bench.sequence_path("sequence10").is_file()
