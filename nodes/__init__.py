"""ComfyUI nodes of the DUGE pack: thin classes that call the `duge` library."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
