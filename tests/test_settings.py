"""One source for every setting: `duge.config.UnlearnConfig` gives the command line's options and the
DUGE Unlearn node's defaults and options; the names are the same everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from duge.cli import UNLEARN_SETTINGS, _unlearn_config, build_parser
from duge.config import METHODS, SETTINGS, TRAINABLE, UnlearnConfig, node_tooltip

REPO = Path(__file__).resolve().parents[1]
NODE_DEFS = json.loads((REPO / "tests" / "data" / "comfyui_node_defs.json").read_text())
NODE_NONE = {"memory_budget_gb": 0.0}  # the node's value that stands for the config's None


def test_cli_without_settings_gives_the_configs_defaults():
    for command in (["unlearn", "--concepts", "c.yaml", "--out", "o"], ["demo"]):
        assert _unlearn_config(build_parser().parse_args(command)) == UnlearnConfig()
    plan = build_parser().parse_args(["plan", "--model", "sd15"])
    assert _unlearn_config(plan) == UnlearnConfig()


def test_every_cli_setting_is_the_kebab_case_field_with_the_configs_default_and_choices():
    parser = build_parser()
    unlearn = parser._subparsers._group_actions[0].choices["unlearn"]
    by_dest = {a.dest: a for a in unlearn._actions}
    defaults = UnlearnConfig()
    for f in fields(UnlearnConfig):
        if f.name not in UNLEARN_SETTINGS:
            continue
        action = by_dest[f.name]
        assert "--" + f.name.replace("_", "-") in action.option_strings
        assert f.metadata["help"] in action.help
        shown = action.help.rsplit("(default: ", 1)[1].rstrip(")")
        default = getattr(defaults, f.name)
        if default is None:
            assert shown == "none"
        elif isinstance(default, float):
            assert float(shown) == default
        else:
            assert shown == str(default)
        assert tuple(action.choices or ()) == tuple(f.metadata["choices"] or ())
    assert set(UNLEARN_SETTINGS) == {f.name for f in fields(UnlearnConfig)} - {"attention_layers"}


def test_cli_settings_reach_the_config_under_their_field_names_and_old_spellings():
    args = build_parser().parse_args(["unlearn", "--concepts", "c", "--out", "o", "--lr", "0.01", "--sampler-steps", "7",
                                      "--memory-budget", "3", "--cache-dir", "d", "--gradient-checkpointing",
                                      "--micro-batch-size", "2", "--esd-eta", "2", "--method", "esd-x"])
    config = _unlearn_config(args)
    assert (config.learning_rate, config.sampler_steps, config.memory_budget_gb, config.image_cache_dir) == (0.01, 7, 3.0, "d")
    assert (config.gradient_checkpointing, config.micro_batch_size, config.esd_eta, config.method) == (True, 2, 2.0, "esd-x")


def test_node_defaults_and_options_are_the_configs():
    """The DUGE Unlearn node's definition as ComfyUI serves it (the snapshot that tests/test_comfyui.py
    checks against a live ComfyUI): every setting input is a config field, with the config's default."""
    node = NODE_DEFS["DugeUnlearn"]["input"]
    inputs = {**node["required"], **node.get("optional", {})}
    defaults = UnlearnConfig()
    names = {f.name for f in fields(UnlearnConfig)}
    checked = 0
    for name, (kind, spec) in inputs.items():
        if name not in names:
            continue
        expected = getattr(defaults, name)
        assert spec["default"] == (expected if expected is not None else NODE_NONE[name]), name
        assert spec["tooltip"].startswith(node_tooltip(name)), name
        checked += 1
        if kind == "COMBO":
            allowed = {"setting": SETTINGS, "trainable": TRAINABLE, "method": tuple(METHODS)}[name]
            assert set(spec["options"]) <= set(allowed)
    assert checked >= 12


@pytest.mark.parametrize("module", ["duge.config", "duge.cli"])
def test_settings_are_read_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
