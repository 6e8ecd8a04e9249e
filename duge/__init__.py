"""DUGE: continual concept unlearning for Stable-Diffusion-family models.

Importing `duge` is cheap: torch, diffusers and the built-in model load only when used.
"""

__version__ = "0.1.0"
