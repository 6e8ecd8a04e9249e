"""Concept sets: the ordered erasure requests a user gives, read from JSON or YAML and checked.

A concept set is a mapping with a `name`, an ordered non-empty list of `requests`, and optional
`general_prompts` (prompts for the erosion check) and `description`. Each request names a
`target` to erase and may give an `anchor` (what the target should become; "" is the empty
prompt), concepts to `preserve`, `aliases` (other names of the target, erased too), prompt
`templates` (each with exactly one `{}` slot) and per-request `steps`, `learning_rate` and `seed`.

Everything read is checked. Whatever the input — a wrong key, a wrong type, invalid syntax, a
file that is not UTF-8 or too large, a YAML tag that would build a Python object —
`load_concept_set` and `parse_concept_set` raise `ConceptSetError` and nothing else, with a
message that names the file ("<text>" for typed-in text), the field (`requests[2].templates[0]`)
and what was expected. YAML is read with `yaml.safe_load` only.

`resolve_request` fills a request's defaults (design doc §2): on the built-in world the anchor
is the generic word of the target's kind, the aliases are the target concept's other names and
the templates vary the other kinds; on a user's model the anchor is the empty prompt, there are
no aliases and the templates are a few generic ones.

`resolve_concept_set` resolves a whole set in order, wherever it came from (a file, typed text, or
ConceptSet and ConceptRequest objects built in code), and applies the anchor rule
(`apply_anchor_rule`): no request is steered to a concept an earlier request of the set erased. An
anchor the request states that names such a concept (or another of its names) is refused with a
ConceptSetError naming both requests; a default anchor that an earlier request erased — "plain",
after a request erasing "plain" — becomes the empty prompt "", so `plain` then `dotted` steers
"dotted" to "". A concept only a later request erases is rightly an anchor until then.

A run that continues an earlier one (a model carrying a DUGE manifest, a continued ComfyUI session)
passes the earlier run's erased names as `erased_before`: both rules then treat them as erased before
request 0 — an anchor naming one is refused, a default anchor falls back to "", and no request
preserves (or replays) one, in every setting.
"""

from __future__ import annotations

import difflib
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import DugeError
from .world.vocabulary import CONCEPTS, CONCEPTS_BY_KIND, GENERIC_WORD, Concept

MAX_FILE_BYTES = 1 << 20  # 1 MiB: far beyond any real concept set
MAX_STRING_CHARS = 1000
MAX_DESCRIPTION_CHARS = 10_000
MAX_LIST_ENTRIES = 1000  # requests, and each list inside a request
MAX_STEPS = 1_000_000
MAX_SEED = 2**32 - 1  # the range every seeded generator accepts (torch, numpy, random)
# YAML flow brackets ([ {) open at once. A concept set needs 3; PyYAML recurses per level and takes
# seconds to give up on a few thousand, so deeper text is refused before it is parsed.
MAX_FLOW_NESTING = 100

TOP_LEVEL_KEYS = ("name", "description", "requests", "general_prompts")
REQUEST_KEYS = ("target", "anchor", "preserve", "aliases", "templates", "steps", "learning_rate", "seed")
FILE_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}

EXAMPLE_CONCEPT_SETS_DIR = Path(__file__).resolve().parent / "concept_sets"

# Default templates on a user's model: the target said plainly and in a few generic frames.
USER_MODEL_TEMPLATES = ("{}", "a photo of {}", "a painting of {}", "an image of {}", "a picture of {}")

# Default templates on the built-in world, per kind of target. Each varies the OTHER kinds, in the
# word orders the world's captions use, with world words only, and reads well with the kind's
# default anchor ("shape" for an object, "" for a colour, "plain" — or "" for "plain" itself — for
# a style).
BUILTIN_WORLD_TEMPLATES = {
    "object": (
        "a {}",
        "a red {}",
        "a striped {}",
        "a dotted blue {}",
        "a picture of a {}",
        "an image of a green checkered {}",
        "a yellow {} that is outlined",
        "the {} is purple and plain",
        "plain pink {}",
        "a picture of a cyan {}",
    ),
    "colour": (
        "a {} shape",
        "a {} circle",
        "a striped {} star",
        "a {} square",
        "a picture of a {} heart",
        "a dotted {} triangle",
        "an image of a {} checkered diamond",
        "a {} cross that is outlined",
        "plain {} crescent",
        "a picture of a {} shape",
    ),
    "style": (
        "a {} shape",
        "a {} red square",
        "a {} circle",
        "a {} blue star",
        "a picture of a {} green heart",
        "an image of a yellow {} triangle",
        "a {} purple cross",
        "an image of a pink {} diamond",
        "{} orange crescent",
        "a picture of a {} cyan shape",
    ),
}


class ConceptSetError(DugeError):
    """A concept set that cannot be read or does not follow the format; the message says where."""


@dataclass
class ConceptRequest:
    """One erasure request as written; `None` and empty lists mean "use the default"."""

    target: str
    anchor: str | None = None  # "" is the empty prompt; None is the default (see resolve_request)
    preserve: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    templates: list[str] | None = None
    steps: int | None = None
    learning_rate: float | None = None
    seed: int | None = None


@dataclass
class ConceptSet:
    """An ordered list of erasure requests with the prompts that watch for erosion."""

    name: str
    requests: list[ConceptRequest]
    general_prompts: list[str] = field(default_factory=list)
    description: str | None = None
    source: str = "<text>"  # the file it was read from, for messages; not part of the format


@dataclass
class ResolvedRequest:
    """A request with every default filled: the prompts the trainer builds come from these fields."""

    target: str
    anchor: str  # "" is the empty prompt
    aliases: list[str]
    preserve: list[str]
    templates: list[str]
    kind: str | None  # the target's kind on the built-in world ("object", "colour", "style"); None elsewhere
    steps: int | None = None  # the request's own settings, None: the run's (UnlearnConfig)
    learning_rate: float | None = None
    seed: int | None = None


# ---------------------------------------------------------------- reading


def load_concept_set(path: str | Path) -> ConceptSet:
    """Read and check the concept set in `path`; the format comes from the suffix (.json, .yaml, .yml).

    Raises ConceptSetError (and nothing else) for a missing, unreadable, too large or invalid file.
    """
    source = str(path)
    try:
        path = Path(path)
    except TypeError:
        raise ConceptSetError(f"{source}: expected a path to a .json, .yaml or .yml file") from None
    fmt = FILE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConceptSetError(
            f"{source}: unknown file type {path.suffix or '(no suffix)'!r}; expected a .json, .yaml or .yml file"
        )
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConceptSetError(f"{source}: no such file; expected a concept set (.json, .yaml or .yml)") from None
    except IsADirectoryError:
        raise ConceptSetError(f"{source}: is a folder; expected a concept set file") from None
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte
        raise ConceptSetError(f"{source}: cannot be read ({error}); expected a readable concept set file") from None
    return parse_concept_set(data, source=source, fmt=fmt)


def parse_concept_set(text: str | bytes, source: str = "<text>", fmt: str = "auto") -> ConceptSet:
    """Check `text` (UTF-8 bytes or str) as a concept set in `fmt` ("json", "yaml" or "auto").

    "auto" reads JSON when the text starts with `{` (and, should that fail, YAML's flow mapping
    `{name: ..., requests: [...]}`; the JSON error is reported when neither reads), YAML otherwise.
    `source` names the text in messages. Raises ConceptSetError, and nothing else, for any text
    that is not a valid set.
    """
    source = str(source)
    text = _decoded_text(text, source)
    if fmt == "json":
        document = _parse_json(text, source)
    elif fmt == "yaml":
        document = _parse_yaml(text, source)
    elif fmt == "auto" and text.lstrip().startswith("{"):
        try:
            document = _parse_json(text, source)
        except ConceptSetError as json_error:
            try:
                document = _parse_yaml(text, source)
            except ConceptSetError:
                raise json_error from None
    elif fmt == "auto":
        document = _parse_yaml(text, source)
    else:
        raise ConceptSetError(f"{source}: unknown format {fmt!r}; expected 'json', 'yaml' or 'auto'")
    return _concept_set_from_document(document, source)


def _decoded_text(text: Any, source: str) -> str:
    """`text` as str, refusing non-UTF-8 bytes and anything over MAX_FILE_BYTES; a leading BOM is dropped."""
    too_large = f"{source}: larger than {MAX_FILE_BYTES // 1024} KiB; expected a concept set of at most that size"
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        if len(data) > MAX_FILE_BYTES:
            raise ConceptSetError(too_large)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConceptSetError(
                f"{source}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                "expected a UTF-8 encoded JSON or YAML file"
            ) from None
    elif isinstance(text, str):
        if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
            raise ConceptSetError(too_large)
    else:
        raise ConceptSetError(f"{source}: expected JSON or YAML text (str or bytes), got {_describe(text)}")
    return text.removeprefix("\ufeff")


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConceptSetError(f"{source}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except (ValueError, RecursionError) as error:  # an integer too long to convert, nesting too deep
        raise ConceptSetError(f"{source}: invalid JSON: {_parser_complaint(error)}") from None


def _flow_nesting(text: str) -> int:
    """The deepest run of open YAML flow brackets in `text`, outside quoted strings and comments.

    An apostrophe inside a plain word reads as a quote here, which can only lower the count.
    """
    depth = deepest = 0
    quote = None
    escaped = comment = False
    for ch in text:
        if comment:
            comment = ch != "\n"
        elif quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            comment = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def _parse_yaml(text: str, source: str) -> Any:
    if text.count("[") + text.count("{") > MAX_FLOW_NESTING and _flow_nesting(text) > MAX_FLOW_NESTING:
        raise ConceptSetError(f"{source}: invalid YAML: brackets nested more than {MAX_FLOW_NESTING} levels deep; "
                              "expected a concept set (a mapping of lists of mappings)")
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        where = _yaml_mark(error.problem_mark) or _yaml_mark(error.context_mark)
        message = f"{source}: invalid YAML{where}: {error.problem or error.context}"
        if error.context and error.problem:
            message += f" ({error.context}{_yaml_mark(error.context_mark, 'started at')})"
        if isinstance(error, yaml.constructor.ConstructorError):
            message += "; expected plain YAML (mappings, lists, strings, numbers, booleans) without tags like !!python/object"
        raise ConceptSetError(message) from None
    except Exception as error:  # noqa: BLE001 - the parser raises more than YAMLError on hostile text
        # (ReaderError for control characters, ValueError for 2001-02-30, RecursionError on deep
        # nesting); whatever it is, the text is not a concept set.
        raise ConceptSetError(f"{source}: invalid YAML: {_parser_complaint(error)}") from None


def _yaml_mark(mark: Any, verb: str = "at") -> str:
    return f" {verb} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _parser_complaint(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply; expected a concept set (a mapping of lists of mappings)"
    return _shorten(" ".join(str(error).split()), 300)


# ---------------------------------------------------------------- checking


def _concept_set_from_document(document: Any, source: str) -> ConceptSet:
    if not isinstance(document, dict):
        got = "an empty document" if document is None else _describe(document)
        raise ConceptSetError(f"{source}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {got}")
    _check_keys(document, TOP_LEVEL_KEYS, ("name", "requests"), source)
    name = _read_text(document["name"], f"{source}: name")
    description = None
    if "description" in document:
        description = _read_text(document["description"], f"{source}: description",
                                 allow_empty=True, max_chars=MAX_DESCRIPTION_CHARS)
    general_prompts = []
    if "general_prompts" in document:
        general_prompts = _read_text_list(document["general_prompts"], f"{source}: general_prompts",
                                          allow_empty_strings=True)

    raw_requests = document["requests"]
    at = f"{source}: requests"
    if not isinstance(raw_requests, list) or not raw_requests:
        raise ConceptSetError(f"{at}: expected a non-empty list of requests, got {_describe(raw_requests)}")
    _check_length(raw_requests, at)
    requests = []
    erased_by: dict[str, int] = {}  # name key -> index of the request that erases it
    for i, raw in enumerate(raw_requests):
        request = _read_request(raw, f"{at}[{i}]")
        for field_name, name_erased in _erased_names(request):
            earlier = erased_by.get(_name_key(name_erased))
            if earlier is not None:
                raise ConceptSetError(
                    f"{at}[{i}].{field_name}: {_shorten(name_erased)!r} is already erased by requests[{earlier}]; "
                    "expected each concept to be erased by one request only"
                )
        for _, name_erased in _erased_names(request):
            erased_by[_name_key(name_erased)] = i
        requests.append(request)
    return ConceptSet(name=name, requests=requests, general_prompts=general_prompts,
                      description=description, source=source)


def _read_request(raw: Any, at: str) -> ConceptRequest:
    if not isinstance(raw, dict):
        raise ConceptSetError(f"{at}: expected a mapping with at least 'target', got {_describe(raw)}")
    _check_keys(raw, REQUEST_KEYS, ("target",), at)
    request = ConceptRequest(target=_read_text(raw["target"], f"{at}.target"))
    if "anchor" in raw:
        request.anchor = _read_text(raw["anchor"], f"{at}.anchor", allow_empty=True,
                                    hint=' ("" is the empty prompt; leave the key out for the default)')
    if "preserve" in raw:
        request.preserve = _read_text_list(raw["preserve"], f"{at}.preserve")
    if "aliases" in raw:
        request.aliases = _read_text_list(raw["aliases"], f"{at}.aliases")
    if "templates" in raw:
        request.templates = _read_templates(raw["templates"], f"{at}.templates")
    if "steps" in raw:
        request.steps = _read_int(raw["steps"], f"{at}.steps", 1, MAX_STEPS)
    if "learning_rate" in raw:
        request.learning_rate = _read_positive_number(raw["learning_rate"], f"{at}.learning_rate")
    if "seed" in raw:
        request.seed = _read_int(raw["seed"], f"{at}.seed", 0, MAX_SEED)

    target_key = _name_key(request.target)
    for j, alias in enumerate(request.aliases):
        if _name_key(alias) == target_key:
            raise ConceptSetError(
                f"{at}.aliases[{j}]: expected another name of the target, got the target itself {_shorten(alias)!r}"
            )
    erased = {target_key} | {_name_key(alias) for alias in request.aliases}
    for j, kept in enumerate(request.preserve):
        if _name_key(kept) in erased:
            what = "the target" if _name_key(kept) == target_key else "an alias of the target"
            raise ConceptSetError(
                f"{at}.preserve[{j}]: {_shorten(kept)!r} is {what}; expected a concept to keep, not one being erased"
            )
    if request.anchor is not None and _name_key(request.anchor) in erased:
        raise ConceptSetError(
            f"{at}.anchor: {_shorten(request.anchor)!r} is the concept being erased; expected what the target should become"
        )
    return request


def _erased_names(request: ConceptRequest) -> list[tuple[str, str]]:
    """(field, name) of every name a request erases: its target and its aliases."""
    return [("target", request.target)] + [(f"aliases[{j}]", alias) for j, alias in enumerate(request.aliases)]


def _check_keys(mapping: dict, allowed: tuple[str, ...], required: tuple[str, ...], at: str) -> None:
    for key in mapping:
        if key not in allowed:
            suggestion = ""
            if isinstance(key, str) and (close := difflib.get_close_matches(key, allowed, n=1)):
                suggestion = f" (did you mean {close[0]!r}?)"
            shown = repr(_shorten(key)) if isinstance(key, str) else _describe(key)
            raise ConceptSetError(f"{at}: unknown key {shown}{suggestion}; expected only: {', '.join(allowed)}")
    for key in required:
        if key not in mapping:
            raise ConceptSetError(
                f"{at}: missing key {key!r}; expected keys: {', '.join(allowed)} (required: {', '.join(required)})"
            )


def _read_text(value: Any, at: str, allow_empty: bool = False, max_chars: int = MAX_STRING_CHARS,
               hint: str = "") -> str:
    if not isinstance(value, str):
        quote = " (quote it in YAML)" if isinstance(value, (bool, int, float)) else ""
        raise ConceptSetError(f"{at}: expected a string{hint}, got {_describe(value)}{quote}")
    if len(value) > max_chars:
        raise ConceptSetError(f"{at}: expected at most {max_chars} characters, got {len(value)}")
    if not allow_empty and not value.strip():
        raise ConceptSetError(f"{at}: expected a non-empty string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConceptSetError(
            f"{at}: expected valid Unicode text, got a string with an unpaired surrogate at position {error.start}"
        ) from None
    return value


def _read_text_list(value: Any, at: str, allow_empty_strings: bool = False) -> list[str]:
    if not isinstance(value, list):
        hint = f" (write [{_shorten(value)}] for a list of one)" if isinstance(value, str) else ""
        raise ConceptSetError(f"{at}: expected a list of strings, got {_describe(value)}{hint}")
    _check_length(value, at)
    texts = [_read_text(entry, f"{at}[{j}]", allow_empty=allow_empty_strings) for j, entry in enumerate(value)]
    first_seen: dict[str, int] = {}
    for j, text in enumerate(texts):
        earlier = first_seen.setdefault(_name_key(text), j)
        if earlier != j:
            raise ConceptSetError(f"{at}[{j}]: {_shorten(text)!r} is the same as entry [{earlier}]; expected each entry once")
    return texts


def _read_templates(value: Any, at: str) -> list[str]:
    if isinstance(value, list) and not value:
        raise ConceptSetError(
            f"{at}: expected a non-empty list of templates (leave the key out for the defaults), got an empty list"
        )
    templates = _read_text_list(value, at)
    for j, template in enumerate(templates):
        problem = template_problem(template)
        if problem is not None:
            raise ConceptSetError(f"{at}[{j}]: {problem}")
    return templates


def _read_int(value: Any, at: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConceptSetError(f"{at}: expected an integer from {minimum} to {maximum}, got {_describe(value)}")
    return value


def _read_positive_number(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        hint = ""
        if isinstance(value, str) and _is_number_text(value):
            hint = " (YAML 1.1 reads 1e-5 as text: write 1.0e-5)"
        raise ConceptSetError(f"{at}: expected a number > 0, got {_describe(value)}{hint}")
    return float(value)


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_length(entries: list, at: str) -> None:
    if len(entries) > MAX_LIST_ENTRIES:
        raise ConceptSetError(f"{at}: expected at most {MAX_LIST_ENTRIES} entries, got {len(entries)}")


def _name_key(name: str) -> str:
    """What two names must share to be the same concept: case and spacing do not count."""
    return " ".join(name.split()).casefold()


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(value: Any) -> str:
    """A short description of a parsed value for messages (never the repr of a whole container)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}" if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return repr(_shorten(value)) if value else "an empty string"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)} {'entry' if len(value) == 1 else 'entries'}"
    if isinstance(value, dict):
        return "a mapping"
    return f"a value of type {type(value).__name__}"


# ---------------------------------------------------------------- templates


def template_problem(template: str) -> str | None:
    """What is wrong with `template` as a prompt template, or None when it has exactly one `{}` slot.

    Literal braces are written `{{` and `}}`; named or numbered slots and format specs are refused.
    """
    only_empty_slot = "expected a template whose only slot is '{}' (write '{{' and '}}' for literal braces)"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        return f"{only_empty_slot}, got {_shorten(template)!r} ({error})"
    slots = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
    if any(slot != ("", "", None) for slot in slots):
        return f"{only_empty_slot}, got {_shorten(template)!r}"
    if not slots:
        return f"expected a template containing '{{}}', got {_shorten(template)!r}"
    if len(slots) > 1:
        return f"expected a template containing exactly one '{{}}', got {_shorten(template)!r} ({len(slots)} slots)"
    return None


def render_prompt(template: str, word: str) -> str:
    """`template` with `word` in its `{}` slot, runs of whitespace collapsed to one space and ends trimmed.

    An empty `word` (the empty prompt as anchor) leaves no double space: "a {} shape" gives "a shape".
    Raises ConceptSetError for a template without exactly one `{}` slot.
    """
    problem = template_problem(template)
    if problem is not None:
        raise ConceptSetError(f"template: {problem}")
    return " ".join(template.format(word).split())


# ---------------------------------------------------------------- defaults


def resolve_request(request: ConceptRequest, builtin_world: bool, location: str = "request") -> ResolvedRequest:
    """`request` with its defaults filled, for the built-in world or for a user's model.

    Anchor: the request's own; else, on the built-in world, the generic word of the target's kind
    (object "shape", colour "" i.e. not mentioned, style "plain" — or "" when the target is "plain"
    itself); else the empty prompt "". Aliases: the request's own; else, on the built-in world, the
    target concept's other names; else none. Templates: the request's own; else, on the built-in
    world, BUILTIN_WORLD_TEMPLATES of the target's kind; else USER_MODEL_TEMPLATES.

    On the built-in world the target and every preserved name must be concepts of the world, the
    aliases other names of the target, and the anchor "", the kind's generic word or another
    concept of the same kind; otherwise ConceptSetError names `location` and the field.
    One request alone knows nothing of the requests before it: a set is resolved with
    `resolve_concept_set`, which also keeps anchors off concepts that earlier requests erased.
    """
    if not builtin_world:
        return ResolvedRequest(
            target=request.target,
            anchor=request.anchor if request.anchor is not None else "",
            aliases=list(request.aliases),
            preserve=list(request.preserve),
            templates=list(request.templates if request.templates is not None else USER_MODEL_TEMPLATES),
            kind=None, steps=request.steps, learning_rate=request.learning_rate, seed=request.seed,
        )

    concept = _world_concept(request.target, f"{location}.target")
    for j, kept in enumerate(request.preserve):
        if _world_concept(kept, f"{location}.preserve[{j}]") is concept:
            raise ConceptSetError(
                f"{location}.preserve[{j}]: {_shorten(kept)!r} is another name of the target {concept.name!r}; "
                "expected a concept to keep, not the one being erased"
            )
    target_key = _name_key(request.target)
    other_names = [name for name in concept.names if name != target_key]
    for j, alias in enumerate(request.aliases):
        if _name_key(alias) not in other_names:
            raise ConceptSetError(
                f"{location}.aliases[{j}]: expected another name of {concept.name!r} "
                f"({', '.join(other_names)}), got {_shorten(alias)!r}"
            )
    return ResolvedRequest(
        target=request.target,
        anchor=_world_anchor(request.anchor, concept, f"{location}.anchor"),
        aliases=list(request.aliases) if request.aliases else other_names,
        preserve=list(request.preserve),
        templates=list(request.templates if request.templates is not None else BUILTIN_WORLD_TEMPLATES[concept.kind]),
        kind=concept.kind, steps=request.steps, learning_rate=request.learning_rate, seed=request.seed,
    )


def resolve_concept_set(concept_set: ConceptSet, builtin_world: bool, setting: str | None = None, *,
                        erased_before: Sequence[str] = (), erased_before_by: str = "an earlier run",
                        notes: list[str] | None = None) -> list[ResolvedRequest]:
    """`resolve_request` on every request, in order, under the anchor rule (`apply_anchor_rule`); errors name
    the set's source and the request index.

    The one place a run's requests are resolved: with the run's `setting` ("sequential",
    "independent", "simultaneous") the continual rule (`apply_continual_rule`) is applied too, and
    the trainer, the manifest and the measurements all take these requests. `setting` None: the
    requests as written.

    `erased_before`: names of concepts an earlier run erased from the model these requests continue
    (`duge.results.erased_in_manifest`; on the built-in world every other name of each counts too), which
    `erased_before_by` names in messages ("an earlier run (the DUGE manifest of 'out/model')"). An anchor
    naming one is refused, a default anchor naming one becomes "", and every request's preserve list drops
    them whatever the setting (so nothing replays them either); each such change is appended to `notes`."""
    requests = [
        resolve_request(request, builtin_world, location=f"{concept_set.source}: requests[{i}]")
        for i, request in enumerate(concept_set.requests)
    ]
    before = names_keys(erased_before, builtin_world)
    apply_anchor_rule(concept_set.requests, requests, location=f"{concept_set.source}: requests",
                      erased_before=before, erased_before_by=erased_before_by, notes=notes, setting=setting)
    for i, request in enumerate(requests):
        dropped = [p for p in request.preserve if _name_key(p) in before]
        request.preserve = [p for p in request.preserve if _name_key(p) not in before]
        if dropped and notes is not None:
            notes.append(f"requests[{i}].preserve ('{request.target}'): dropped "
                         f"{', '.join(repr(p) for p in dropped)} (erased by {erased_before_by})")
    return requests if setting is None else apply_continual_rule(requests, setting)


def apply_anchor_rule(written: list[ConceptRequest], requests: list[ResolvedRequest],
                      location: str = "requests", erased_before: set[str] = frozenset(),
                      erased_before_by: str = "an earlier run", notes: list[str] | None = None,
                      setting: str | None = None) -> list[ResolvedRequest]:
    """The anchor rule of a sequence, in one place: no request is steered to a concept that an earlier
    request erased (under any of its names: `erased_name_keys`), or that an earlier run erased
    (`erased_before`: name keys, that run named `erased_before_by`). By `setting`: independent requests
    each start from the model the run was given, so only `erased_before` counts; simultaneous requests
    are erased together, so every other request's target counts, a later one's too; None and
    sequential: earlier requests. An anchor the request states
    (`written[i]`) is refused with a ConceptSetError naming `location[i].anchor` and the request or run that
    erased it; a default anchor (the built-in world's generic word of the kind) falls back to the empty
    prompt "" (noted in `notes` when an earlier run erased it). A concept only a later request erases is
    rightly an anchor until then. Changes `requests` (resolved from `written`, in order) in place and
    returns them."""
    erased_by: dict[str, str] = {key: erased_before_by for key in erased_before}  # name key -> who erased it
    if setting == "simultaneous":
        for i, resolved in enumerate(requests):
            for key in erased_name_keys(resolved):
                erased_by.setdefault(key, f"requests[{i}] (erased in the same run)")
    for i, (request, resolved) in enumerate(zip(written, requests)):
        earlier = erased_by.get(_name_key(resolved.anchor))
        if earlier is not None and request.anchor is not None:
            raise ConceptSetError(
                f"{location}[{i}].anchor: {_shorten(request.anchor)!r} was erased by {earlier}; "
                "expected what the target should become among concepts still in the model"
            )
        if earlier is not None:
            if notes is not None and _name_key(resolved.anchor) in erased_before:
                notes.append(f"requests[{i}].anchor ('{resolved.target}'): the default {resolved.anchor!r} was erased "
                             f"by {erased_before_by}; steered to '' (the empty prompt) instead")
            resolved.anchor = ""
        if setting != "independent":
            for key in erased_name_keys(resolved):
                erased_by.setdefault(key, f"requests[{i}]")
    return requests


def apply_continual_rule(requests: list[ResolvedRequest], setting: str) -> list[ResolvedRequest]:
    """Each request's own preserve list under the continual rule (`preserved_at`): request k preserves nothing
    erased at or before k (in the simultaneous setting, nothing any request erases). Independent requests
    each start from the original model and keep their preserve lists. Changes `requests` in place and
    returns them; what earlier requests replay at request k comes from `preserved_at(requests, k)`."""
    if setting == "independent" or not requests:
        return requests
    last = preserved_at(requests, len(requests) - 1) if setting == "simultaneous" else None
    own = [last[k] if last is not None else preserved_at(requests, k)[k] for k in range(len(requests))]
    for request, kept in zip(requests, own):
        request.preserve = kept
    return requests


_WORLD_CONCEPT_BY_NAME = {name: concept for concept in CONCEPTS for name in concept.names}


def _world_concept(name: str, at: str) -> Concept:
    concept = _WORLD_CONCEPT_BY_NAME.get(_name_key(name))
    if concept is None:
        known = "; ".join(
            f"{kind}s: " + ", ".join(c.name for c in concepts) for kind, concepts in CONCEPTS_BY_KIND.items()
        )
        raise ConceptSetError(
            f"{at}: {_shorten(name)!r} is not a concept of the built-in world; expected one of its concepts "
            f"(or another of their names) — {known}"
        )
    return concept


def _world_anchor(anchor: str | None, concept: Concept, at: str) -> str:
    """The anchor for erasing `concept` on the built-in world (see resolve_request)."""
    generic = GENERIC_WORD[concept.kind]
    if anchor is None:
        return "" if generic in concept.names else generic
    key = _name_key(anchor)
    if key in concept.names:
        raise ConceptSetError(
            f"{at}: {_shorten(anchor)!r} is another name of the target {concept.name!r}; expected what the target should become"
        )
    same_kind = {name for other in CONCEPTS_BY_KIND[concept.kind] for name in other.names}
    if key in ("", generic) or key in same_kind:
        return anchor
    choices = ["'' (the empty prompt)"] + ([repr(generic)] if generic else []) + [
        repr(other.name) for other in CONCEPTS_BY_KIND[concept.kind] if other is not concept
    ]
    raise ConceptSetError(
        f"{at}: expected what {'an' if concept.kind[0] in 'aeiou' else 'a'} {concept.kind} should become "
        "on the built-in world, one of "
        f"{', '.join(choices)}; got {_shorten(anchor)!r}"
    )


# ---------------------------------------------------------------- writing and examples


def concept_set_to_dict(concept_set: ConceptSet) -> dict:
    """The set as plain data in the file format: `parse_concept_set` of its JSON or YAML gives it back.

    Fields left to their defaults (None, empty aliases and general prompts) are left out; the
    source is not part of the format.
    """
    document: dict[str, Any] = {"name": concept_set.name}
    if concept_set.description is not None:
        document["description"] = concept_set.description
    document["requests"] = [_request_to_dict(request) for request in concept_set.requests]
    if concept_set.general_prompts:
        document["general_prompts"] = list(concept_set.general_prompts)
    return document


def _request_to_dict(request: ConceptRequest) -> dict:
    entry: dict[str, Any] = {"target": request.target}
    if request.anchor is not None:
        entry["anchor"] = request.anchor
    entry["preserve"] = list(request.preserve)
    if request.aliases:
        entry["aliases"] = list(request.aliases)
    if request.templates is not None:
        entry["templates"] = list(request.templates)
    for key in ("steps", "learning_rate", "seed"):
        if getattr(request, key) is not None:
            entry[key] = getattr(request, key)
    return entry


def example_concept_set_names() -> list[str]:
    """Names of the example concept sets shipped with the package (file names without suffix), sorted."""
    return sorted(path.stem for path in EXAMPLE_CONCEPT_SETS_DIR.iterdir() if path.suffix in FILE_SUFFIXES)


def example_concept_set_path(name: str) -> Path:
    """The file of the shipped example concept set `name` ("demo" or "demo.yaml").

    Raises ConceptSetError listing the examples when there is none of that name.
    """
    files = {path.name: path for path in EXAMPLE_CONCEPT_SETS_DIR.iterdir() if path.suffix in FILE_SUFFIXES}
    for candidate in (name, *(f"{name}{suffix}" for suffix in FILE_SUFFIXES)):
        if candidate in files:
            return files[candidate]
    raise ConceptSetError(
        f"no example concept set {name!r}; expected one of: {', '.join(example_concept_set_names())}"
    )


# ---------------------------------------------------------------- continual semantics


def erased_through(requests: list[ResolvedRequest], k: int) -> set[str]:
    """Name keys of everything requests[0..k] erase (targets and aliases; on the built-in world every
    name of each erased concept, so a synonym cannot slip past)."""
    return {key for request in requests[: k + 1] for key in erased_name_keys(request)}


def erased_name_keys(request: ResolvedRequest) -> set[str]:
    """Name keys of everything `request` erases: its target and aliases, and on the built-in world every
    name of each erased concept."""
    return names_keys((request.target, *request.aliases), builtin_world=request.kind is not None)


def names_keys(names: Sequence[str], builtin_world: bool) -> set[str]:
    """Name keys of `names`, and on the built-in world every name of each concept they name."""
    keys: set[str] = set()
    for name in names:
        keys.add(_name_key(name))
        concept = _WORLD_CONCEPT_BY_NAME.get(_name_key(name)) if builtin_world else None
        if concept is not None:
            keys.update(concept.names)
    return keys


def erased_keys(requests: Sequence[ResolvedRequest], before: set[str] = frozenset()) -> set[str]:
    """The lower-case names (target and aliases) of every request in `requests`, with `before` (keys an earlier
    run erased): what counts as erased once those requests are done."""
    return set(before) | {n.lower() for r in requests for n in (r.target, *r.aliases)}


def preserved_at(requests: list[ResolvedRequest], k: int) -> list[list[str]]:
    """The continual rule, in one place: at request k (0-based), the preserve list of each request
    0..k with every concept erased at or before k left out.

    Whatever a method preserves, replays as related images or puts into a closed-form preserve set
    at request k comes from here: a concept that a later request erases was rightly preserved by
    earlier requests, but from the request that erases it on it is dropped from all of them. The
    simultaneous setting (every request at once) is `k = len(requests) - 1`.
    """
    if not 0 <= k < len(requests):
        raise IndexError(f"preserved_at: request {k} of {len(requests)}")
    erased = erased_through(requests, k)
    return [[p for p in r.preserve if _name_key(p) not in erased] for r in requests[: k + 1]]
