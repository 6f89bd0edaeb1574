"""Inference: generation (plain or proxy-tuned); chat and serving build on it."""
from .generate import generate
from .proxy import ProxyTuned

__all__ = ["generate", "ProxyTuned"]
