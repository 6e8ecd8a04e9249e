"""Backends: the only code that knows a host (diffusers pipelines, ComfyUI's ModelPatcher)."""

from .base import Backend

__all__ = ["Backend"]
