"""ComfyUI entry point of the DUGE node pack.

ComfyUI imports this file when the repository sits in `custom_nodes/` (or in a `custom_nodes`
folder named by --extra-model-paths-config). Importing is cheap: no model is loaded, nothing is
trained or written. The nodes (V3 schema, `comfy_api`) live in `nodes/` and call the `duge` library
next to them.

Only `comfy_entrypoint` and `WEB_DIRECTORY` are exported: ComfyUI registers a module's
NODE_CLASS_MAPPINGS first and then ignores its comfy_entrypoint, so the two are never both here.
On a ComfyUI too old for the V3 schema the pack logs which version it needs and registers nothing.
"""

import importlib.util
import logging
import os
import sys

REQUIRED_COMFYUI = "0.3.60 (the V3 node schema, and the attention override hook that training on the CPU needs)"
WEB_DIRECTORY = "./web"

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("duge") is None:  # the library shipped in this folder; appended, so it shadows nothing
    sys.path.append(_PACK_DIR)

try:
    from comfy_api.latest import ComfyExtension, io  # noqa: F401
except ImportError:
    logging.error("[DUGE] this ComfyUI has no V3 node schema (comfy_api.latest); the DUGE nodes need ComfyUI %s "
                  "or newer. Update ComfyUI; no DUGE node was loaded.", REQUIRED_COMFYUI)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
else:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
