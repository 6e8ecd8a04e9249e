"""`duge unlearn` on a model an earlier DUGE run edited: what that run erased stays erased for the new requests
(no anchor on it, nothing preserves it), and the new manifest lists the earlier requests first."""

import sys
from pathlib import Path

import pytest

from duge import cli, run
from duge.io import read_manifest, read_safetensors_metadata
from duge.results import erased_in_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests
from trainer_helpers import tiny_config  # noqa: E402

ERASE_CIRCLE = "{name: first, requests: [{target: circle, preserve: [square]}]}"
STEER_TO_DISC = """
name: steers to the erased circle
requests:
  - target: square
    anchor: disc
"""
PRESERVE_DISC = """
name: preserves the erased circle
requests:
  - target: red
    preserve: [Disc, orange]
"""


def _concepts(tmp_path, name, text) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def test_a_second_run_keeps_the_first_runs_erasures_and_lists_its_requests_first(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setattr(run, "before_after_grid", lambda *args, **kwargs: Image.new("RGB", (4, 4)))  # tested elsewhere
    config = tiny_config(eval="none")
    run.run_unlearn("builtin", _concepts(tmp_path, "first", ERASE_CIRCLE), tmp_path / "first", config,
                    log=lambda *a: None)
    model = tmp_path / "first" / "model"
    by = f"an earlier run, per the DUGE manifest of '{model}'"

    # an anchor on the erased circle (under another of its names) is refused before anything is trained
    code = cli.main(["unlearn", "--model", str(model), "--concepts", _concepts(tmp_path, "steer", STEER_TO_DISC),
                     "--out", str(tmp_path / "refused"), "--eval", "none"])
    assert code == 2 and not (tmp_path / "refused").exists()
    assert f"requests[0].anchor: 'disc' was erased by {by};" in capsys.readouterr().err

    logged = []
    report = run.run_unlearn(str(model), _concepts(tmp_path, "preserve", PRESERVE_DISC), tmp_path / "second", config,
                             log=logged.append)
    note = f"requests[0].preserve ('red'): dropped 'Disc' (erased by {by})"
    assert report["notes"] == [note] and note in logged
    assert note in (tmp_path / "second" / "report.html").read_text().replace("&#x27;", "'")
    manifest = read_manifest(tmp_path / "second" / "model")
    assert [(r["target"], r["preserve"]) for r in manifest["requests"]] == [("circle", ["square"]), ("red", ["orange"])]
    assert manifest["extra"]["earlier_requests"] == 1
    assert read_manifest(tmp_path / "second" / "model.safetensors")["requests"] == manifest["requests"]
    lora = read_safetensors_metadata(tmp_path / "second" / "loras" / "01_red.safetensors")
    assert '"request_index": 2' in lora["duge_manifest"]  # its row in the manifest, after the earlier one
    # a third run sees both runs' erasures, every name of each
    assert set(erased_in_manifest(manifest, "second")) >= {"circle", "disc", "red"}
