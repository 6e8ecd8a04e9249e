"""Load Concept Set: a concept set from the `concept_sets` model folder, the pack's examples, or typed text."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from duge.concepts import EXAMPLE_CONCEPT_SETS_DIR, ConceptSetError, load_concept_set, parse_concept_set

from .types import CATEGORY, ConceptSetType

FOLDER = "concept_sets"
TYPED_TEXT = "(typed text below)"
SUFFIXES = {".json", ".yaml", ".yml"}


def register_folder() -> None:
    """`models/concept_sets` (and any `concept_sets:` entry of extra_model_paths.yaml) plus the pack's examples."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.add_model_folder_path(FOLDER, str(EXAMPLE_CONCEPT_SETS_DIR))
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(SUFFIXES))


def concept_set_files() -> list[str]:
    if FOLDER not in folder_paths.folder_names_and_paths:
        register_folder()
    return folder_paths.get_filename_list(FOLDER)


def _read(file: str, text: str):
    if file == TYPED_TEXT:
        return parse_concept_set(text, source="<typed text>")
    path = folder_paths.get_full_path(FOLDER, file)
    if path is None:
        raise ConceptSetError(f"{file}: not found in the concept_sets folders {folder_paths.get_folder_paths(FOLDER)}")
    return load_concept_set(path)


class LoadConceptSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeLoadConceptSet",
            display_name="Load Concept Set",
            category=CATEGORY,
            description="The ordered erasure requests for DUGE Unlearn: a JSON/YAML file from models/concept_sets "
                        "(or the pack's examples), or a set typed in the text field.",
            inputs=[
                io.Combo.Input("file", options=[TYPED_TEXT] + concept_set_files(),
                               default="demo.yaml",
                               tooltip="A concept set in models/concept_sets, or '(typed text below)'."),
                io.String.Input("text", multiline=True, default="",
                                placeholder="name: my set\nrequests:\n  - target: circle\n    preserve: [square]",
                                tooltip="Used when file is '(typed text below)': the set in YAML or JSON."),
            ],
            outputs=[ConceptSetType.Output(display_name="concept_set"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def validate_inputs(cls, file, text):
        try:
            _read(file, text)
        except ConceptSetError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, file, text) -> io.NodeOutput:
        concept_set = _read(file, text)
        lines = [f"{concept_set.name}: {len(concept_set.requests)} request(s)"]
        for k, request in enumerate(concept_set.requests, start=1):
            keep = f", keep {', '.join(request.preserve)}" if request.preserve else ""
            lines.append(f"{k}. erase '{request.target}'{keep}")
        return io.NodeOutput(concept_set, "\n".join(lines))
