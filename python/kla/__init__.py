"""kla: Python helpers for the Kaczmarz Linear Attention library."""

from .safetensors import load, save

__all__ = ["load", "save"]
