"""Fuzzing the concept-set parser with hypothesis: whatever the text, only ConceptSetError escapes.

Generated inputs: arbitrary JSON/YAML values serialised both ways, documents shaped like concept
sets with wrong or odd values, raw bytes (non-UTF-8 included), valid documents with bytes broken,
YAML built from tags (`!!python/object/apply`, `!!binary`, `!!set`, ...), anchors, aliases and
merge keys, billion-laughs alias bombs, deep nesting and huge strings. Each input must either
parse — and then survive a round trip through `concept_set_to_dict` — or raise ConceptSetError
whose message starts with the source (file or "<text>") and says what was expected or where the
syntax broke.

CI runs `DUGE_FUZZ_EXAMPLES` examples per property (default 50; fewer for the two costly ones,
see PROPERTIES: 319 inputs, each parsed up to three ways); `pytest -m slow tests/test_fuzz_concepts.py`
runs up to 3000 per property (15 602 inputs: the alias bombs and huge strings exhaust their
spaces). Each test prints how many inputs it tried (`-s`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duge.concepts import (
    MAX_FILE_BYTES,
    REQUEST_KEYS,
    ConceptSetError,
    concept_set_to_dict,
    load_concept_set,
    parse_concept_set,
)

CI_EXAMPLES = int(os.environ.get("DUGE_FUZZ_EXAMPLES", "50"))
SLOW_EXAMPLES = 3000

# Any character, unpaired surrogates and control characters included.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(any_text, children, max_size=6),
    max_leaves=30,
)
word = st.sampled_from(["circle", "red", "striped", "Van Gogh", "", " ", "{}", "a {}", "a {} {}", "{0}", "{x}",
                        "{{}}", "circle ", "CIRCLE", "null", "1e-5", "yes", "☕", "\x00", "\ud800"])
field_value = word | scalars | st.lists(word | scalars, max_size=4) | st.dictionaries(word, word, max_size=2)
request_like = st.dictionaries(st.sampled_from(REQUEST_KEYS + ("prserve", "Target", "extra")), field_value,
                               max_size=len(REQUEST_KEYS))
set_like = st.fixed_dictionaries(
    {"name": word | scalars, "requests": st.lists(request_like | json_values, max_size=5) | json_values},
    optional={"description": word | scalars, "general_prompts": st.lists(word, max_size=4) | json_values,
              "unknown": json_values},
)
YAML_PIECES = [
    "name: n\n", "requests:\n", "  - target: circle\n", "  - target: red\n    preserve: [orange]\n",
    "  - &r {target: star}\n", "  - *r\n", "  - <<: *r\n    anchor: shape\n", "x: &a [1, 2]\n", "y: *a\n", "z: *nope\n",
    "!!python/object/apply:os.system [echo pwned]\n", "name: !!python/name:os.system\n", "name: !!binary aGk=\n",
    "name: !!set {a, b}\n", "name: !!timestamp 2001-12-14\n", "name: !!float nan\n", "name: !custom x\n",
    "name: !!omap [a: 1]\n", "? [a, b]\n: c\n", "%YAML 1.1\n---\n", "---\n", "...\n", "\t", "'", '"', "{", "[", "]",
    "}", ": ", "- ", "#", "|\n  block\n", ">-\n  folded\n", "\\x00", "\x85", "\ufeff", "\x07", "name: 1e-5\n",
    "steps: 0x7fffffffffffffffffffffff\n", "seed: -1\n", "learning_rate: .inf\n",
]
yaml_text = st.lists(st.sampled_from(YAML_PIECES), max_size=12).map("".join)


def alias_bomb(levels: int, width: int, use: bool) -> str:
    """Billion laughs: level k is a list of `width` aliases of level k-1 (width**levels leaves)."""
    lines = ["a0: &a0 [lol, lol]"]
    for k in range(1, levels + 1):
        lines.append(f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]")
    lines.append(f"name: n\nrequests: *a{levels}" if use else "name: n\nrequests:\n  - target: circle")
    return "\n".join(lines) + "\n"


bombs = st.builds(alias_bomb, st.integers(1, 12), st.integers(1, 12), st.booleans())
nesting = st.builds(lambda opener, n: opener * n, st.sampled_from(["[", "{", '{"a":', "- ", "a:\n  ", "[{a: "]),
                    st.integers(1, 3_000))
huge = st.builds(lambda n, where: {"name": "x" * n, "requests": [{"target": "t"}]} if where == "name"
                 else {"name": "n", "requests": [{"target": "t", "templates": ["{}" + "y" * n]}]},
                 st.sampled_from([0, 999, 1000, 1001, 100_000, MAX_FILE_BYTES - 40, MAX_FILE_BYTES + 1]),
                 st.sampled_from(["name", "template"]))
VALID = "name: demo\nrequests:\n  - target: circle\n    preserve: [square, heart]\n  - target: red\n"
broken_bytes = st.builds(lambda position, byte: VALID.encode()[:position] + bytes([byte]) + VALID.encode()[position:],
                         st.integers(0, len(VALID)), st.integers(0x80, 0xFF))


def only_concept_set_error(text, source: str = "<text>", fmt: str = "auto") -> None:
    """Parse `text`: a valid set must round-trip; anything else must be a located ConceptSetError."""
    try:
        concept_set = parse_concept_set(text, source=source, fmt=fmt)
    except ConceptSetError as error:
        message = str(error)
        assert message.startswith(f"{source}: "), message
        assert any(word in message for word in ("expected", "invalid JSON", "invalid YAML")), message
        return
    document = concept_set_to_dict(concept_set)
    again = parse_concept_set(json.dumps(document), source=source, fmt="json")
    assert concept_set_to_dict(again) == document


def check_value_as_json_and_yaml(value) -> None:
    only_concept_set_error(json.dumps(value), fmt="json")
    only_concept_set_error(json.dumps(value), fmt="auto")
    try:
        text = yaml.safe_dump(value, allow_unicode=True)
    except yaml.YAMLError:
        return  # PyYAML cannot write every value (e.g. some surrogates); the JSON form was checked
    only_concept_set_error(text, fmt="yaml")


def check_huge(value) -> None:
    """JSON at every size; YAML up to 100 000 characters (PyYAML writes and reads a megabyte slowly)."""
    text = json.dumps(value)
    only_concept_set_error(text, fmt="json")
    only_concept_set_error(text.encode("utf-8"), fmt="auto")
    if len(text) <= 100_200:
        only_concept_set_error(yaml.safe_dump(value), fmt="yaml")


def check_text_every_format(text) -> None:
    for fmt in ("auto", "json", "yaml"):
        only_concept_set_error(text, fmt=fmt)


def check_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".json", ".yaml"):
            path = Path(folder) / f"set{suffix}"
            path.write_bytes(data)
            try:
                load_concept_set(path)
            except ConceptSetError as error:
                assert str(error).startswith(f"{path}: "), str(error)


# name: (strategy, check, share of the example budget). Deep YAML nesting costs PyYAML up to ~4 s
# per document (it recurses until Python's limit) and 14 sizes x 2 fields exhaust the huge strings.
PROPERTIES = {
    "any JSON/YAML value": (json_values, check_value_as_json_and_yaml, 1.0),
    "concept-set-shaped documents": (set_like, check_value_as_json_and_yaml, 1.0),
    "raw bytes": (st.binary(max_size=400), check_text_every_format, 1.0),
    "valid set with a non-UTF-8 byte": (broken_bytes, check_file, 1.0),
    "YAML tags, anchors, aliases, merge keys": (yaml_text, check_text_every_format, 1.0),
    "billion-laughs alias bombs": (bombs, check_text_every_format, 1.0),
    "deep nesting": (nesting, check_text_every_format, 0.1),
    "huge strings": (huge, check_huge, 0.3),
}


@pytest.mark.parametrize("text", ["[" * 5000, "name: n\nrequests: " + "[{a: " * 3000, "{" * 200 + "}" * 200])
def test_deep_yaml_flow_nesting_is_refused_before_pyyaml_recurses(text):
    with pytest.raises(ConceptSetError, match="brackets nested more than 100 levels deep"):
        parse_concept_set(text, fmt="yaml")


def test_brackets_in_quotes_and_comments_do_not_count_as_nesting():
    deep = "[" * 150
    text = f'name: "{deep}"\ndescription: \'{deep}\'  # {deep}\nrequests:\n  - {{target: circle, preserve: [square]}}\n'
    assert parse_concept_set(text, fmt="yaml").name == deep


def run_property(name: str, examples: int) -> int:
    """Run one property for up to `examples` x its share inputs; returns how many inputs were tried
    (fewer when hypothesis has exhausted a small space, as for the alias bombs' 288)."""
    strategy, check, share = PROPERTIES[name]
    tried = []

    def counted(value):
        tried.append(1)
        check(value)

    test = settings(max_examples=max(5, int(examples * share)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(strategy)(counted))
    test()
    print(f"{name}: {len(tried)} inputs")
    return len(tried)


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzzed_concept_sets_raise_only_concept_set_error(name):
    assert run_property(name, CI_EXAMPLES) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzzed_concept_sets_raise_only_concept_set_error_thousands(name):
    assert run_property(name, SLOW_EXAMPLES) >= 5
