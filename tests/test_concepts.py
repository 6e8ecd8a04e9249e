"""The concept-set format: what it accepts, what it rejects and how it says so, and the defaults."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from duge.concepts import (
    BUILTIN_WORLD_TEMPLATES,
    EXAMPLE_CONCEPT_SETS_DIR,
    MAX_FILE_BYTES,
    USER_MODEL_TEMPLATES,
    ConceptRequest,
    ConceptSet,
    ConceptSetError,
    concept_set_to_dict,
    example_concept_set_names,
    example_concept_set_path,
    load_concept_set,
    parse_concept_set,
    render_prompt,
    resolve_concept_set,
    resolve_request,
    template_problem,
)
from duge.errors import DugeError
from duge.world.scenes import CAPTION_TEMPLATES
from duge.world.tokenizer import world_words
from duge.world.vocabulary import CONCEPTS, CONCEPTS_BY_KIND, concept_by_name

BUILTIN_EXAMPLES = ("demo", "objects", "sequence10", "sequence10b", "tuning")


def valid_document(**top_level) -> dict:
    document = {
        "name": "test set",
        "requests": [
            {"target": "circle", "preserve": ["square"]},
            {"target": "red", "preserve": ["orange"]},
            {"target": "striped", "preserve": ["dotted"]},
        ],
    }
    document.update(top_level)
    return document


def with_request(index: int, **fields) -> dict:
    document = valid_document()
    document["requests"][index].update(fields)
    return document


def write_both_formats(tmp_path, document) -> list:
    json_path = tmp_path / "concepts.json"
    json_path.write_text(json.dumps(document), encoding="utf-8")
    yaml_path = tmp_path / "concepts.yaml"
    yaml_path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return [json_path, yaml_path]


def assert_rejected(tmp_path, document, *fragments) -> None:
    """Both the JSON and the YAML file of `document` are rejected, the message naming the file and `fragments`."""
    for path in write_both_formats(tmp_path, document):
        with pytest.raises(ConceptSetError) as caught:
            load_concept_set(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: "), message
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"


def file_rejection(path, content: str | bytes | None) -> str:
    """The message of loading `path` after writing `content` into it (None: write nothing)."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConceptSetError) as caught:
        load_concept_set(path)
    return str(caught.value)


def rejection_message(text, **kwargs) -> str:
    with pytest.raises(ConceptSetError) as caught:
        parse_concept_set(text, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------- accepted input


def test_valid_set_loads_from_json_and_yaml_alike(tmp_path):
    document = valid_document(description="three kinds", general_prompts=["a blue square", ""])
    document["requests"][0].update(anchor="", aliases=["disc"], templates=["a {}", "a picture of a {}"],
                                   steps=50, learning_rate=2e-4, seed=7)
    json_path, yaml_path = write_both_formats(tmp_path, document)
    from_json, from_yaml = load_concept_set(json_path), load_concept_set(yaml_path)
    assert from_json.source == str(json_path)
    from_yaml.source = from_json.source
    assert from_json == from_yaml
    assert from_json.requests[0] == ConceptRequest(
        target="circle", anchor="", preserve=["square"], aliases=["disc"],
        templates=["a {}", "a picture of a {}"], steps=50, learning_rate=2e-4, seed=7,
    )
    assert from_json.requests[1] == ConceptRequest(target="red", preserve=["orange"])
    assert from_json.general_prompts == ["a blue square", ""]
    assert from_json.description == "three kinds"


def test_optional_fields_default_to_none_and_empty_lists():
    concept_set = parse_concept_set("name: minimal\nrequests:\n  - target: circle\n")
    assert concept_set == ConceptSet(name="minimal", requests=[ConceptRequest(target="circle")], source="<text>")
    request = concept_set.requests[0]
    assert (request.anchor, request.preserve, request.aliases, request.templates) == (None, [], [], None)
    assert (request.steps, request.learning_rate, request.seed) == (None, None, None)


def test_integer_learning_rate_is_read_as_float():
    concept_set = parse_concept_set('{"name": "n", "requests": [{"target": "t", "learning_rate": 1}]}')
    assert concept_set.requests[0].learning_rate == 1.0
    assert isinstance(concept_set.requests[0].learning_rate, float)


def test_auto_format_reads_json_when_text_starts_with_brace_and_yaml_otherwise():
    # NaN is JSON-only syntax (Python's json accepts it); in YAML this text would be a flow
    # mapping with the string "NaN", so the error message shows which parser ran.
    as_json = rejection_message('{"name": "n", "requests": [{"target": "t", "learning_rate": NaN}]}')
    assert "got the number nan" in as_json
    as_yaml = rejection_message("name: n\nrequests: [{target: t, learning_rate: NaN}]")
    assert "got 'NaN'" in as_yaml


def test_auto_format_reads_a_yaml_flow_mapping_and_reports_json_errors_for_broken_braces():
    assert parse_concept_set("{name: n, requests: [{target: t}]}").requests[0].target == "t"
    assert rejection_message('{"name": "n", "requests": [').startswith("<text>: invalid JSON at line 1, column 28")
    assert rejection_message("{name: n, requests: [{target: t}]}", fmt="json").startswith("<text>: invalid JSON")


def test_bytes_with_byte_order_mark_are_accepted():
    text = "\ufeffname: n\nrequests:\n  - target: t\n"
    assert parse_concept_set(text.encode("utf-8")).name == "n"
    assert parse_concept_set(text).name == "n"


def test_parse_names_typed_in_text_in_messages():
    message = rejection_message("name: n\nrequests: []\n")
    assert message == "<text>: requests: expected a non-empty list of requests, got an empty list"


def test_concept_set_error_is_a_duge_error():
    assert issubclass(ConceptSetError, DugeError)


# ---------------------------------------------------------------- rejected structure


def test_unknown_top_level_key_is_rejected_listing_the_allowed_keys(tmp_path):
    assert_rejected(tmp_path, valid_document(prompts=["x"]),
                    "unknown key 'prompts'", "expected only: name, description, requests, general_prompts")


def test_unknown_request_key_is_rejected_with_a_suggestion(tmp_path):
    assert_rejected(tmp_path, with_request(1, preserv=["pink"]),
                    "requests[1]: unknown key 'preserv' (did you mean 'preserve'?)",
                    "expected only: target, anchor, preserve, aliases, templates, steps, learning_rate, seed")


@pytest.mark.parametrize("missing", ["name", "requests"])
def test_missing_top_level_key_is_rejected(tmp_path, missing):
    document = valid_document()
    del document[missing]
    assert_rejected(tmp_path, document, f"missing key '{missing}'")


def test_missing_target_is_rejected(tmp_path):
    document = valid_document()
    del document["requests"][2]["target"]
    assert_rejected(tmp_path, document, "requests[2]: missing key 'target'")


@pytest.mark.parametrize("document", [[1, 2], "just text", 42, None], ids=["list", "string", "number", "empty"])
def test_document_that_is_not_a_mapping_is_rejected(tmp_path, document):
    assert_rejected(tmp_path, document, "expected a mapping with keys name, description, requests, general_prompts")


@pytest.mark.parametrize("requests", [[], {"target": "circle"}, "circle"], ids=["empty", "mapping", "string"])
def test_requests_must_be_a_non_empty_list(tmp_path, requests):
    assert_rejected(tmp_path, valid_document(requests=requests), "requests: expected a non-empty list of requests")


def test_request_that_is_not_a_mapping_is_rejected(tmp_path):
    document = valid_document()
    document["requests"][1] = "red"
    assert_rejected(tmp_path, document, "requests[1]: expected a mapping with at least 'target', got 'red'")


# ---------------------------------------------------------------- rejected targets and relations


@pytest.mark.parametrize("target", ["", "   ", "\t\n"])
def test_empty_or_whitespace_target_is_rejected(tmp_path, target):
    assert_rejected(tmp_path, with_request(1, target=target), "requests[1].target: expected a non-empty string")


def test_duplicate_targets_are_rejected_ignoring_case_and_spacing(tmp_path):
    document = valid_document()
    document["requests"][2]["target"] = "  Circle "
    assert_rejected(tmp_path, document, "requests[2].target: '  Circle ' is already erased by requests[0]")


def test_target_erased_earlier_as_an_alias_is_rejected(tmp_path):
    document = with_request(0, aliases=["disc"])
    document["requests"][2]["target"] = "DISC"
    assert_rejected(tmp_path, document, "requests[2].target: 'DISC' is already erased by requests[0]")


def test_target_listed_in_its_own_preserve_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(1, preserve=["orange", "Red"]),
                    "requests[1].preserve[1]: 'Red' is the target; expected a concept to keep")


def test_alias_listed_in_preserve_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(0, aliases=["disc"], preserve=["disc"]),
                    "requests[0].preserve[0]: 'disc' is an alias of the target")


def test_target_listed_in_its_own_aliases_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(0, aliases=["circle"]),
                    "requests[0].aliases[0]: expected another name of the target, got the target itself 'circle'")


def test_anchor_equal_to_the_target_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(0, anchor="CIRCLE"), "requests[0].anchor: 'CIRCLE' is the concept being erased")


def test_repeated_preserve_entry_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(0, preserve=["square", "heart", "Square"]),
                    "requests[0].preserve[2]: 'Square' is the same as entry [0]")


# ---------------------------------------------------------------- templates


def test_template_without_slot_is_rejected_naming_file_index_and_field(tmp_path):
    path = tmp_path / "concepts.yaml"
    path.write_text(yaml.safe_dump(with_request(2, templates=["a {}", "x {}"])), encoding="utf-8")
    load_concept_set(path)
    message = file_rejection(path, yaml.safe_dump(with_request(2, templates=["a photo", "a {}"])))
    assert message == f"{path}: requests[2].templates[0]: expected a template containing '{{}}', got 'a photo'"


@pytest.mark.parametrize(
    "template, expectation",
    [
        ("a photo", "expected a template containing '{}'"),
        ("{} and {}", "expected a template containing exactly one '{}'"),
        ("a {x}", "expected a template whose only slot is '{}'"),
        ("a {0}", "expected a template whose only slot is '{}'"),
        ("a {:>9}", "expected a template whose only slot is '{}'"),
        ("a {!r}", "expected a template whose only slot is '{}'"),
        ("a {} {", "expected a template whose only slot is '{}'"),
        ("a {{}}", "expected a template containing '{}'"),
    ],
)
def test_bad_templates_are_rejected(tmp_path, template, expectation):
    assert_rejected(tmp_path, with_request(1, templates=["a {}", template]), "requests[1].templates[1]: " + expectation)


def test_empty_template_list_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(0, templates=[]),
                    "requests[0].templates: expected a non-empty list of templates")


def test_template_with_literal_braces_is_accepted_and_rendered():
    assert template_problem("{{logo}} {}") is None
    assert render_prompt("{{logo}} {}", "cat") == "{logo} cat"


def test_render_prompt_collapses_whitespace_left_by_an_empty_word():
    assert render_prompt("a {} shape", "") == "a shape"
    assert render_prompt("{} orange crescent", "") == "orange crescent"
    assert render_prompt("a  {}  circle ", "red") == "a red circle"


def test_render_prompt_keeps_braces_in_the_word():
    assert render_prompt("a {}", "{x}") == "a {x}"


def test_render_prompt_refuses_a_template_without_slot():
    with pytest.raises(ConceptSetError, match="expected a template containing"):
        render_prompt("a photo", "cat")


# ---------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    "fields, fragments",
    [
        ({"target": 5}, ["requests[0].target: expected a string, got the integer 5"]),
        ({"target": True}, ["requests[0].target: expected a string, got the boolean true", "quote it"]),
        ({"target": ["circle"]}, ["requests[0].target: expected a string, got a list of 1 entry"]),
        ({"anchor": None}, ["requests[0].anchor: expected a string", "empty prompt", "got null"]),
        ({"preserve": "square"}, ["requests[0].preserve: expected a list of strings, got 'square'", "[square]"]),
        ({"preserve": ["square", 3]}, ["requests[0].preserve[1]: expected a string, got the integer 3"]),
        ({"preserve": ["square", ""]}, ["requests[0].preserve[1]: expected a non-empty string"]),
        ({"aliases": {"a": "b"}}, ["requests[0].aliases: expected a list of strings, got a mapping"]),
        ({"templates": "a {}"}, ["requests[0].templates: expected a list of strings"]),
        ({"steps": True}, ["requests[0].steps: expected an integer from 1 to 1000000, got the boolean true"]),
        ({"steps": 0}, ["requests[0].steps: expected an integer from 1 to 1000000, got the integer 0"]),
        ({"steps": 1.5}, ["requests[0].steps: expected an integer", "got the number 1.5"]),
        ({"steps": "10"}, ["requests[0].steps: expected an integer", "got '10'"]),
        ({"learning_rate": 0}, ["requests[0].learning_rate: expected a number > 0, got the integer 0"]),
        ({"learning_rate": -0.1}, ["requests[0].learning_rate: expected a number > 0"]),
        ({"learning_rate": False}, ["requests[0].learning_rate: expected a number > 0, got the boolean false"]),
        ({"learning_rate": float("nan")}, ["requests[0].learning_rate: expected a number > 0, got the number nan"]),
        ({"learning_rate": float("inf")}, ["requests[0].learning_rate: expected a number > 0, got the number inf"]),
        ({"seed": -1}, ["requests[0].seed: expected an integer from 0 to 4294967295, got the integer -1"]),
        ({"seed": 2**40}, ["requests[0].seed: expected an integer from 0 to 4294967295"]),
        ({"seed": 1.0}, ["requests[0].seed: expected an integer", "got the number 1.0"]),
    ],
)
def test_wrong_types_and_values_in_a_request_are_rejected(tmp_path, fields, fragments):
    assert_rejected(tmp_path, with_request(0, **fields), *fragments)


@pytest.mark.parametrize(
    "fields, fragments",
    [
        ({"name": 3}, ["name: expected a string, got the integer 3"]),
        ({"name": " "}, ["name: expected a non-empty string"]),
        ({"description": ["x"]}, ["description: expected a string, got a list of 1 entry"]),
        ({"general_prompts": "a circle"}, ["general_prompts: expected a list of strings"]),
        ({"general_prompts": ["a circle", None]}, ["general_prompts[1]: expected a string, got null"]),
    ],
)
def test_wrong_types_at_top_level_are_rejected(tmp_path, fields, fragments):
    assert_rejected(tmp_path, valid_document(**fields), *fragments)


def test_yaml_exponent_without_dot_gets_a_hint():
    message = rejection_message("name: n\nrequests:\n  - target: t\n    learning_rate: 1e-5\n")
    assert message == ("<text>: requests[0].learning_rate: expected a number > 0, got '1e-5' "
                       "(YAML 1.1 reads 1e-5 as text: write 1.0e-5)")
    assert parse_concept_set("name: n\nrequests:\n  - target: t\n    learning_rate: 1.0e-5\n").requests[0].learning_rate == 1e-5


def test_yaml_word_that_reads_as_boolean_gets_a_hint():
    message = rejection_message("name: n\nrequests:\n  - target: yes\n")
    assert message == "<text>: requests[0].target: expected a string, got the boolean true (quote it in YAML)"


def test_huge_yaml_hex_integer_is_described_not_printed():
    message = rejection_message("name: n\nrequests:\n  - target: t\n    steps: 0x" + "f" * 5000 + "\n")
    assert "requests[0].steps: expected an integer from 1 to 1000000, got an integer of 20000 bits" in message


# ---------------------------------------------------------------- size limits


def test_string_longer_than_the_limit_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(1, target="x" * 1001),
                    "requests[1].target: expected at most 1000 characters, got 1001")


def test_list_longer_than_the_limit_is_rejected(tmp_path):
    assert_rejected(tmp_path, with_request(0, preserve=[f"p{i}" for i in range(1001)]),
                    "requests[0].preserve: expected at most 1000 entries, got 1001")


def test_file_larger_than_the_limit_is_rejected_before_parsing(tmp_path):
    path = tmp_path / "concepts.yaml"
    message = file_rejection(path, b"#" * (MAX_FILE_BYTES + 1))
    assert message == f"{path}: larger than 1024 KiB; expected a concept set of at most that size"
    assert "larger than 1024 KiB" in rejection_message("#" * (MAX_FILE_BYTES + 1))


# ---------------------------------------------------------------- files and syntax


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "concepts.yaml"
    message = file_rejection(path, "name: café\nrequests:\n  - target: t\n".encode("latin-1"))
    assert message == f"{path}: not UTF-8 text (byte 0xe9 at offset 9); expected a UTF-8 encoded JSON or YAML file"


def test_invalid_json_is_rejected_with_line_and_column(tmp_path):
    path = tmp_path / "concepts.json"
    message = file_rejection(path, '{\n  "name": "n",\n  "requests": [\n    {"target": "t",}\n  ]\n}\n')
    assert message.startswith(f"{path}: invalid JSON at line 4, column 20: Expecting property name")


def test_invalid_yaml_is_rejected_with_line_and_column(tmp_path):
    path = tmp_path / "concepts.yaml"
    message = file_rejection(path, "name: n\nrequests: [\n  {target: t}\n")
    assert message.startswith(f"{path}: invalid YAML at line 4, column 1: expected ',' or ']'"), message
    assert "started at line 2, column 11" in message


def test_yaml_python_object_tag_is_refused(tmp_path):
    path = tmp_path / "concepts.yaml"
    message = file_rejection(path, "name: !!python/object/apply:os.system [echo hacked]\nrequests:\n  - target: t\n")
    assert message.startswith(f"{path}: invalid YAML at line 1, column 7: could not determine a constructor")
    assert "python/object/apply:os.system" in message
    assert "without tags like !!python/object" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: n\n---\nname: m\n", "invalid YAML at line 2, column 1: but found another document"),
        ("name: 2001-02-30\nrequests: []\n", "invalid YAML: day is out of range for month"),
        ("name: n\nrequests:\n  - target: \x07\n", "invalid YAML: unacceptable character #x0007"),
        ("name: !!set {a: null}\nrequests:\n  - target: t\n", "name: expected a string, got a value of type set"),
        ("name: !!binary aGVsbG8=\nrequests:\n  - target: t\n", "name: expected a string, got a value of type bytes"),
        ("name: n\nrequests:\n  - {target: t, 1: x}\n", "requests[0]: unknown key the integer 1"),
    ],
)
def test_unusual_yaml_is_rejected_with_concept_set_error(text, fragment):
    assert fragment in rejection_message(text)


def test_json_unpaired_surrogate_in_a_string_is_rejected():
    message = rejection_message('{"name": "\\ud800", "requests": [{"target": "t"}]}')
    assert message == "<text>: name: expected valid Unicode text, got a string with an unpaired surrogate at position 0"


@pytest.mark.parametrize("name, expectation", [
    ("missing.yaml", "no such file"),
    ("concepts.txt", "unknown file type '.txt'; expected a .json, .yaml or .yml file"),
    ("concepts", "unknown file type '(no suffix)'"),
])
def test_unreadable_paths_are_rejected(tmp_path, name, expectation):
    path = tmp_path / name
    content = None if name == "missing.yaml" else "name: n\nrequests:\n  - target: t\n"
    assert file_rejection(path, content).startswith(f"{path}: {expectation}")


def test_folder_named_like_a_concept_set_is_rejected(tmp_path):
    folder = tmp_path / "sets.yaml"
    folder.mkdir()
    with pytest.raises(ConceptSetError, match="is a folder"):
        load_concept_set(folder)


def test_yml_suffix_reads_yaml(tmp_path):
    path = tmp_path / "concepts.YML"
    path.write_text("name: n\nrequests:\n  - target: t\n", encoding="utf-8")
    assert load_concept_set(path).requests[0].target == "t"


def test_unknown_format_and_non_text_input_are_concept_set_errors():
    assert "unknown format 'toml'" in rejection_message("name = 1", fmt="toml")
    assert "expected JSON or YAML text (str or bytes), got null" in rejection_message(None)
    assert "got the integer 12" in rejection_message(12)


# ---------------------------------------------------------------- round trip


def full_concept_set() -> ConceptSet:
    return ConceptSet(
        name="everything",
        requests=[
            ConceptRequest(target="Van Gogh", anchor="painting", preserve=["Monet", "Picasso"],
                           aliases=["Vincent van Gogh"], templates=["{}", "a painting by {}", "{{x}} {}"],
                           steps=300, learning_rate=1e-5, seed=42),
            ConceptRequest(target="Snoopy", anchor=""),
            ConceptRequest(target="café ☕", preserve=["tea"]),
        ],
        general_prompts=["a photo of a dog", ""],
        description="all fields\nused",
        source="<text>",
    )


def test_concept_set_round_trips_through_json_and_yaml():
    concept_set = full_concept_set()
    document = concept_set_to_dict(concept_set)
    assert parse_concept_set(json.dumps(document)) == concept_set
    assert parse_concept_set(yaml.safe_dump(document, allow_unicode=True)) == concept_set
    assert parse_concept_set(yaml.safe_dump(document).encode("utf-8"), fmt="yaml") == concept_set


def test_dict_leaves_defaults_out():
    document = concept_set_to_dict(ConceptSet(name="n", requests=[ConceptRequest(target="t")]))
    assert document == {"name": "n", "requests": [{"target": "t", "preserve": []}]}


@pytest.mark.parametrize("name", example_concept_set_names())
def test_example_sets_round_trip(name):
    concept_set = load_concept_set(example_concept_set_path(name))
    again = parse_concept_set(json.dumps(concept_set_to_dict(concept_set)), source=concept_set.source)
    assert again == concept_set


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    "target, kind, anchor, aliases",
    [
        ("circle", "object", "shape", ["disc"]),
        ("red", "colour", "", ["crimson"]),
        ("striped", "style", "plain", ["banded"]),
        ("plain", "style", "", ["solid"]),  # the generic word is the target itself: not mentioned instead
        ("Disc", "object", "shape", ["circle"]),  # a synonym as target: the canonical name is the alias
    ],
)
def test_builtin_world_defaults_per_kind(target, kind, anchor, aliases):
    resolved = resolve_request(ConceptRequest(target=target, preserve=[]), builtin_world=True)
    assert (resolved.target, resolved.kind, resolved.anchor, resolved.aliases) == (target, kind, anchor, aliases)
    assert resolved.templates == list(BUILTIN_WORLD_TEMPLATES[kind])
    assert resolved.preserve == []


def test_user_model_defaults():
    resolved = resolve_request(ConceptRequest(target="Van Gogh", preserve=["Monet"]), builtin_world=False)
    assert resolved.anchor == ""
    assert resolved.aliases == []
    assert resolved.preserve == ["Monet"]
    assert resolved.templates == ["{}", "a photo of {}", "a painting of {}", "an image of {}", "a picture of {}"]
    assert resolved.templates == list(USER_MODEL_TEMPLATES)
    assert resolved.kind is None


def test_stated_anchor_aliases_and_templates_are_kept():
    request = ConceptRequest(target="circle", anchor="square", aliases=["disc"], templates=["a big {}"])
    resolved = resolve_request(request, builtin_world=True)
    assert (resolved.anchor, resolved.aliases, resolved.templates) == ("square", ["disc"], ["a big {}"])
    stated_empty = resolve_request(ConceptRequest(target="striped", anchor=""), builtin_world=True)
    assert stated_empty.anchor == ""


def test_resolving_does_not_share_lists_with_the_request():
    request = ConceptRequest(target="circle", preserve=["square"])
    resolved = resolve_request(request, builtin_world=True)
    resolved.preserve.append("heart")
    resolved.templates.append("x {}")
    assert request.preserve == ["square"]
    assert "x {}" not in BUILTIN_WORLD_TEMPLATES["object"]


@pytest.mark.parametrize("kind", ["object", "colour", "style"])
def test_builtin_templates_use_world_words_and_vary_only_other_kinds(kind):
    templates = BUILTIN_WORLD_TEMPLATES[kind]
    assert 8 <= len(templates) <= 12
    assert len(set(templates)) == len(templates)
    words = set(world_words())
    same_kind_words = {name for concept in CONCEPTS_BY_KIND[kind] for name in concept.names}
    for template in templates:
        assert template_problem(template) is None
        fixed_words = template.replace("{}", " ").split()
        assert set(fixed_words) <= words, template
        assert not set(fixed_words) & same_kind_words, template
    for concept in CONCEPTS_BY_KIND[kind]:
        resolved = resolve_request(ConceptRequest(target=concept.name), builtin_world=True)
        for template in resolved.templates:
            for prompt in (render_prompt(template, resolved.target), render_prompt(template, resolved.anchor)):
                assert set(prompt.split()) <= words, prompt
                assert prompt == " ".join(prompt.split())


def test_builtin_templates_follow_caption_word_orders():
    # The world's captions put the style before the colour except in "an image of a {colour} {style} ...".
    assert any(template.startswith("an image of a") for template in CAPTION_TEMPLATES)
    assert "a striped {} star" in BUILTIN_WORLD_TEMPLATES["colour"]


# ---------------------------------------------------------------- built-in world checks


@pytest.mark.parametrize(
    "request_, fragments",
    [
        (ConceptRequest(target="banana"),
         ["request.target: 'banana' is not a concept of the built-in world",
          "objects: circle, square", "colours: red", "styles: plain"]),
        (ConceptRequest(target="circle", preserve=["square", "pear"]),
         ["request.preserve[1]: 'pear' is not a concept of the built-in world"]),
        (ConceptRequest(target="circle", preserve=["disc"]),
         ["request.preserve[0]: 'disc' is another name of the target 'circle'"]),
        (ConceptRequest(target="circle", aliases=["square"]),
         ["request.aliases[0]: expected another name of 'circle' (disc), got 'square'"]),
        (ConceptRequest(target="circle", anchor="disc"),
         ["request.anchor: 'disc' is another name of the target 'circle'"]),
        (ConceptRequest(target="circle", anchor="red"),
         ["request.anchor: expected what an object should become", "'shape'", "'square'", "got 'red'"]),
        (ConceptRequest(target="red", anchor="shape"),
         ["request.anchor: expected what a colour should become", "'' (the empty prompt)", "got 'shape'"]),
    ],
)
def test_builtin_world_rejects_names_outside_the_world(request_, fragments):
    with pytest.raises(ConceptSetError) as caught:
        resolve_request(request_, builtin_world=True)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_resolve_concept_set_names_source_and_request_index():
    concept_set = parse_concept_set("name: n\nrequests:\n  - target: circle\n  - target: Monet\n", source="my.yaml")
    with pytest.raises(ConceptSetError) as caught:
        resolve_concept_set(concept_set, builtin_world=True)
    assert str(caught.value).startswith("my.yaml: requests[1].target: 'Monet' is not a concept of the built-in world")
    assert [r.target for r in resolve_concept_set(concept_set, builtin_world=False)] == ["circle", "Monet"]


# ---------------------------------------------------------------- examples


def test_example_names_and_paths():
    assert set(example_concept_set_names()) == {"demo", "objects", "sequence10", "sequence10b", "tuning",
                                                 "van_gogh_example"}
    assert example_concept_set_path("demo") == EXAMPLE_CONCEPT_SETS_DIR / "demo.yaml"
    assert example_concept_set_path("objects.json") == EXAMPLE_CONCEPT_SETS_DIR / "objects.json"
    with pytest.raises(ConceptSetError, match="no example concept set '../demo'; expected one of: demo, objects"):
        example_concept_set_path("../demo")


@pytest.mark.parametrize("name", BUILTIN_EXAMPLES)
def test_builtin_examples_resolve_on_the_world_without_conflicts(name):
    concept_set = load_concept_set(example_concept_set_path(name))
    resolved = resolve_concept_set(concept_set, builtin_world=True)
    erased: set[str] = set()
    for request in resolved:
        target = concept_by_name(request.target)
        for kept in request.preserve:
            # Related concepts of the same kind, none erased by an earlier request (in the
            # sequential setting that would pull the erased concept back).
            assert concept_by_name(kept).kind == target.kind
            assert concept_by_name(kept).name not in erased, (request.target, kept)
        erased.add(target.name)
    words = set(world_words())
    all_names_erased = {name for concept in CONCEPTS if concept.name in erased for name in concept.names}
    assert concept_set.general_prompts
    for prompt in concept_set.general_prompts:
        assert set(prompt.split()) <= words, prompt
        assert not set(prompt.split()) & all_names_erased, prompt


def test_demo_erases_an_object_then_a_colour_then_a_style():
    resolved = resolve_concept_set(load_concept_set(example_concept_set_path("demo")), builtin_world=True)
    assert [request.kind for request in resolved] == ["object", "colour", "style"]
    assert all(request.preserve for request in resolved)


@pytest.mark.parametrize("name", ["sequence10", "sequence10b"])
def test_reported_sequences_have_ten_distinct_targets_and_keep_concepts_of_every_kind(name):
    resolved = resolve_concept_set(load_concept_set(example_concept_set_path(name)), builtin_world=True)
    assert len(resolved) == 10
    erased = {concept_by_name(request.target).name for request in resolved}
    assert len(erased) == 10
    assert {request.kind for request in resolved} == {"object", "colour", "style"}
    for kind, concepts in CONCEPTS_BY_KIND.items():
        kept = [concept for concept in concepts if concept.name not in erased]
        assert len(kept) >= 3, kind
    assert all(len(request.preserve) >= 2 for request in resolved)
    general = load_concept_set(example_concept_set_path(name)).general_prompts
    assert general and not any(n in p.split() for p in general for r in resolved for n in [r.target, *r.aliases])


def test_the_second_sequence_mixes_kinds_otherwise_and_tuning_is_neither_reported_sequence():
    kinds = {name: [r.kind for r in resolve_concept_set(load_concept_set(example_concept_set_path(name)), True)]
             for name in ("sequence10", "sequence10b", "tuning")}
    assert kinds["sequence10"] != kinds["sequence10b"]
    assert [kinds[n].count("colour") for n in ("sequence10", "sequence10b")] == [4, 5]
    targets = {name: {r.target for r in load_concept_set(example_concept_set_path(name)).requests}
               for name in ("sequence10", "sequence10b", "tuning")}
    assert not targets["tuning"] & targets["sequence10"]
    assert targets["tuning"] != targets["sequence10b"] and len(targets["tuning"] & targets["sequence10b"]) <= 1


def test_van_gogh_example_is_for_a_users_model():
    concept_set = load_concept_set(example_concept_set_path("van_gogh_example"))
    (request,) = concept_set.requests
    assert (request.target, request.anchor) == ("Van Gogh", "painting")
    assert (request.preserve, request.aliases) == (["Monet", "Picasso"], ["Vincent van Gogh"])
    assert request.learning_rate == 1e-5 and request.steps and request.seed == 0
    resolved = resolve_request(request, builtin_world=False)
    assert resolved.kind is None and resolved.templates == request.templates
    assert "a landscape in the style of painting" in [render_prompt(t, resolved.anchor) for t in resolved.templates]
    with pytest.raises(ConceptSetError, match="not a concept of the built-in world"):
        resolve_concept_set(concept_set, builtin_world=True)


# ---------------------------------------------------------------- only ConceptSetError escapes


def parse_or_concept_set_error(text, fmt="auto") -> None:
    try:
        parse_concept_set(text, fmt=fmt)
    except ConceptSetError:
        pass


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "{" * 100_000,
        '{"a":' * 50_000,
        "- " * 5_000 + "x",
        "".join(f"{'  ' * depth}a:\n" for depth in range(3_000)),
        "a: &x [" + "*x, " * 10 + "]",
        "name: n\nrequests:\n  - &r {target: t, preserve: [a, b]}\n" + "  - *r\n" * 1000,
        "name: n\nrequests: " + "[" * 2_000 + "]" * 2_000,
    ],
    ids=["json-lists", "json-braces", "json-objects", "yaml-lists", "yaml-mappings", "yaml-alias",
         "yaml-repeated-alias", "yaml-nested-flow"],
)
def test_deeply_nested_or_self_referencing_documents_give_concept_set_error_only(text):
    for fmt in ("auto", "json", "yaml"):
        with pytest.raises(ConceptSetError):
            parse_concept_set(text, fmt=fmt)


def test_random_junk_bytes_give_concept_set_error_only():
    rng = random.Random(1234)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        for fmt in ("auto", "json", "yaml"):
            parse_or_concept_set_error(data, fmt)


def test_mutated_example_files_give_a_concept_set_or_concept_set_error_only():
    rng = random.Random(99)
    alphabet = list("{}[]:,-'\"!&*#\n\t @\\%|>?") + [
        "\x00", "\udc80", "é", "1e5", "true", "null", "{}", "!!python/name:os.system",
    ]
    originals = [example_concept_set_path(name).read_text(encoding="utf-8") for name in example_concept_set_names()]
    for _ in range(400):
        text = list(rng.choice(originals))
        for _ in range(rng.randrange(1, 6)):
            position = rng.randrange(len(text))
            action = rng.randrange(3)
            if action == 0:
                del text[position]
            elif action == 1:
                text.insert(position, rng.choice(alphabet))
            else:
                text[position] = rng.choice(alphabet)
        mutated = "".join(text)
        parse_or_concept_set_error(mutated)
        parse_or_concept_set_error(mutated.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------- continual semantics


def _resolved(text: str):
    from duge.concepts import resolve_concept_set

    return resolve_concept_set(parse_concept_set(text), builtin_world=True)


LATER_ERASED = """
name: later
requests:
  - target: yellow
    preserve: [orange, green]
  - target: circle
    preserve: [square]
  - target: green
    preserve: [cyan]
"""


def test_a_concept_is_preserved_until_the_request_that_erases_it_and_dropped_everywhere_from_then_on():
    from duge.concepts import preserved_at

    requests = _resolved(LATER_ERASED)
    # before green is erased, request 1 rightly preserves it
    assert preserved_at(requests, 0) == [["orange", "green"]]
    assert preserved_at(requests, 1) == [["orange", "green"], ["square"]]
    # from request 3 (which erases green) on, no request preserves it any more
    assert preserved_at(requests, 2) == [["orange"], ["square"], ["cyan"]]


def test_an_earlier_erasure_is_never_preserved_later_under_any_of_its_names():
    from duge.concepts import preserved_at

    requests = _resolved("""
name: synonyms
requests:
  - target: circle
  - target: square
    preserve: [Disc, diamond]
""")
    assert preserved_at(requests, 1) == [[], ["diamond"]]  # "disc" is the circle, erased at request 1
    with pytest.raises(IndexError):
        preserved_at(requests, 2)


# ---------------------------------------------------------------- anchors of a sequence


ERASES_CIRCLE_THEN_STEERS_TO_IT = """
name: steered to an erased concept
requests:
  - target: circle
  - target: red
  - target: striped
  - target: star
  - target: square
    anchor: {anchor}
"""


@pytest.mark.parametrize("anchor", ["circle", "Disc"])  # the erased concept, or another of its names
def test_an_anchor_an_earlier_request_erased_is_refused_naming_both_requests(tmp_path, anchor):
    path = tmp_path / "set.yaml"
    path.write_text(ERASES_CIRCLE_THEN_STEERS_TO_IT.format(anchor=anchor), encoding="utf-8")
    concept_set = load_concept_set(path)
    for setting, by in ((None, ""), ("sequential", ""), ("simultaneous", " (erased in the same run)")):
        with pytest.raises(ConceptSetError) as caught:
            resolve_concept_set(concept_set, builtin_world=True, setting=setting)
        assert str(caught.value) == (
            f"{path}: requests[4].anchor: {anchor!r} was erased by requests[0]{by}; "
            "expected what the target should become among concepts still in the model"
        )
    # independent requests each start from the model the run was given, where the circle is still drawn
    assert resolve_concept_set(concept_set, builtin_world=True, setting="independent")[4].anchor == anchor


def test_a_simultaneous_run_refuses_an_anchor_a_later_request_erases_and_independent_keeps_default_anchors():
    text = """
name: erased later
requests:
  - target: square
    anchor: circle
  - target: circle
"""
    with pytest.raises(ConceptSetError, match=r"requests\[0\]\.anchor: 'circle' was erased by requests\[1\] "
                                              r"\(erased in the same run\)"):
        resolve_concept_set(parse_concept_set(text), builtin_world=True, setting="simultaneous")
    assert resolve_concept_set(parse_concept_set(text), builtin_world=True, setting="sequential")[0].anchor == "circle"
    plain_first = ConceptSet("plain first", [ConceptRequest(target="plain"), ConceptRequest(target="dotted")])
    assert [r.anchor for r in resolve_concept_set(plain_first, builtin_world=True, setting="independent")] == ["", "plain"]
    assert [r.anchor for r in resolve_concept_set(plain_first, builtin_world=True, setting="simultaneous")] == ["", ""]


def test_a_sets_anchor_is_checked_on_a_users_model_and_when_built_in_code():
    concept_set = ConceptSet(name="in code", source="<code>", requests=[
        ConceptRequest(target="Van Gogh", aliases=["Vincent van Gogh"]),
        ConceptRequest(target="Monet", anchor="painting"),
        ConceptRequest(target="Picasso", anchor="vincent VAN gogh"),
    ])
    with pytest.raises(ConceptSetError) as caught:
        resolve_concept_set(concept_set, builtin_world=False, setting="sequential")
    assert str(caught.value).startswith("<code>: requests[2].anchor: 'vincent VAN gogh' was erased by requests[0];")
    concept_set.requests[2].anchor = "Monet"  # erased by request 1
    with pytest.raises(ConceptSetError, match=r"requests\[2\]\.anchor: 'Monet' was erased by requests\[1\];"):
        resolve_concept_set(concept_set, builtin_world=False)
    concept_set.requests[2].anchor = "painting"
    assert [r.anchor for r in resolve_concept_set(concept_set, builtin_world=False)] == ["", "painting", "painting"]


@pytest.mark.parametrize("erased_first", ["plain", "solid"])  # "solid" is another name of plain
def test_a_default_anchor_an_earlier_request_erased_becomes_the_empty_prompt(erased_first):
    alone = resolve_concept_set(ConceptSet("alone", [ConceptRequest(target="dotted")]), builtin_world=True)
    assert alone[0].anchor == "plain"
    requests = [ConceptRequest(target=erased_first), ConceptRequest(target="dotted"), ConceptRequest(target="circle")]
    resolved = resolve_concept_set(ConceptSet("plain first", requests), builtin_world=True, setting="sequential")
    assert [r.anchor for r in resolved] == ["", "", "shape"]
    assert requests[1].anchor is None  # the set as written is unchanged


def test_an_anchor_only_a_later_request_erases_is_kept_until_then():
    resolved = _resolved("""
name: erased later
requests:
  - target: square
    anchor: circle
  - target: dotted
  - target: circle
  - target: plain
  - target: checkered
""")
    # circle and plain are what requests 0 and 1 become until requests 2 and 3 erase them
    assert [r.anchor for r in resolved] == ["circle", "plain", "shape", "", ""]


def test_shipped_sets_and_the_tuning_sequence_resolve_under_the_anchor_rule():
    from pathlib import Path

    method_tuning = Path(__file__).resolve().parents[1] / "benchmarks" / "tuning" / "method_tuning10.yaml"
    paths = [example_concept_set_path(name) for name in BUILTIN_EXAMPLES] + [method_tuning]
    for path in paths:
        concept_set = load_concept_set(path)
        for setting in ("sequential", "independent", "simultaneous"):
            resolved = resolve_concept_set(concept_set, builtin_world=True, setting=setting)
            assert len(resolved) == len(concept_set.requests)
    tuning = resolve_concept_set(load_concept_set(example_concept_set_path("tuning")), builtin_world=True)
    assert (tuning[0].target, tuning[0].anchor) == ("plain", "")  # plain first, and no later style request
    assert resolve_concept_set(load_concept_set(example_concept_set_path("van_gogh_example")), builtin_world=False)


# ---------------------------------------------------------------- continuing an earlier run


CONTINUES = """
name: continues an earlier run
requests:
  - target: square
    preserve: [Emerald, orange]
  - target: dotted
    preserve: [green, checkered]
"""


@pytest.mark.parametrize("erased_earlier", ["green", "emerald"])  # "emerald" is another name of green
def test_an_anchor_an_earlier_run_erased_is_refused_naming_the_run(erased_earlier):
    assert "emerald" in concept_by_name("green").names
    concept_set = parse_concept_set(CONTINUES.replace("target: dotted", "target: red\n    anchor: GREEN"))
    for setting in (None, "sequential", "independent", "simultaneous"):
        with pytest.raises(ConceptSetError) as caught:
            resolve_concept_set(concept_set, builtin_world=True, setting=setting, erased_before=[erased_earlier],
                                erased_before_by="an earlier run, per the DUGE manifest of 'out/model'")
        assert str(caught.value) == (
            "<text>: requests[1].anchor: 'GREEN' was erased by an earlier run, per the DUGE manifest of "
            "'out/model'; expected what the target should become among concepts still in the model")
    user_set = ConceptSet("user", [ConceptRequest(target="Monet", anchor="vincent van gogh")], source="<code>")
    with pytest.raises(ConceptSetError, match=r"^<code>: requests\[0\]\.anchor: 'vincent van gogh' was erased by an "
                                              r"earlier run;"):
        resolve_concept_set(user_set, builtin_world=False, erased_before=["Vincent van Gogh"])


@pytest.mark.parametrize("erased_earlier", ["plain", "solid"])  # "solid" is another name of plain
def test_a_default_anchor_an_earlier_run_erased_becomes_the_empty_prompt_with_a_note(erased_earlier):
    notes = []
    resolved = resolve_concept_set(parse_concept_set(CONTINUES), builtin_world=True, setting="sequential",
                                   erased_before=[erased_earlier], notes=notes)
    assert [r.anchor for r in resolved] == ["shape", ""]
    assert notes == ["requests[1].anchor ('dotted'): the default 'plain' was erased by an earlier run; "
                     "steered to '' (the empty prompt) instead"]


@pytest.mark.parametrize("setting", [None, "sequential", "independent", "simultaneous"])
def test_no_request_preserves_or_replays_what_an_earlier_run_erased_under_any_of_its_names(setting):
    from duge.concepts import preserved_at

    notes = []
    resolved = resolve_concept_set(parse_concept_set(CONTINUES), builtin_world=True, setting=setting,
                                   erased_before=["green", "Checkered"], notes=notes)
    assert [r.preserve for r in resolved] == [["orange"], []]  # in every setting, independent included
    assert preserved_at(resolved, 1) == [["orange"], []]  # what request 1 replays of request 0
    assert notes == ["requests[0].preserve ('square'): dropped 'Emerald' (erased by an earlier run)",
                     "requests[1].preserve ('dotted'): dropped 'green', 'checkered' (erased by an earlier run)"]
    without = resolve_concept_set(parse_concept_set(CONTINUES), builtin_world=True, setting=setting)
    assert without[0].preserve == ["Emerald", "orange"]  # nothing erased before: the lists as the rules leave them


def test_erased_in_manifest_reads_each_rows_erased_names_or_its_target():
    from duge.errors import ModelLoadError
    from duge.results import erased_in_manifest

    manifest = {"requests": [{"target": "circle", "erased": ["circle", "disc"]}, {"target": "red"}]}
    assert erased_in_manifest(manifest, "m") == ["circle", "disc", "red"]
    for broken in ({"requests": {}}, {"requests": [{"anchor": "shape"}]}, {"requests": [{"target": "x", "erased": []}]}):
        with pytest.raises(ModelLoadError, match="^m: "):
            erased_in_manifest(broken, "m")
