"""ComfyUI entry point of the DUGE node pack.

ComfyUI imports this file when the repository sits in `custom_nodes/`. Importing is cheap: no
model is loaded, nothing is trained or written. The nodes live in `nodes/` and call the `duge`
library next to them.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:  # so that `import duge` finds the library shipped in this folder
    sys.path.insert(0, _PACK_DIR)

WEB_DIRECTORY = "./web"

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
