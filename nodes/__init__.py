"""ComfyUI nodes of the DUGE pack (V3 schema): thin classes that call the `duge` library.

Imported only on a ComfyUI that has `comfy_api` (see the pack's root `__init__.py`). Importing is
cheap: the library's heavy parts load when a node runs.
"""

from comfy_api.latest import ComfyExtension, io

from .compare import CompareOutputs
from .concept_set import LoadConceptSet, register_folder
from .demo_model import LoadDemoModel
from .probe import AttentionProbe
from .save import SaveUnlearnedCheckpoint, SaveUnlearningLora
from .unlearn import DugeUnlearn

NODES = [LoadDemoModel, LoadConceptSet, DugeUnlearn, AttentionProbe, CompareOutputs, SaveUnlearnedCheckpoint,
         SaveUnlearningLora]


class DugeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DugeExtension:
    register_folder()
    return DugeExtension()
