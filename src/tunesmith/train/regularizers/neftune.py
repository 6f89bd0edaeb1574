"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning").

For embeddings ``X`` of shape (B, L, d) the forward pass in training mode returns
``X + ε · α / sqrt(L·d)``, ``ε ~ Uniform(-1, 1)`` elementwise (Algorithm 1; ``L`` is the padded batch
length, as in transformers' ``neftune_post_forward_hook``). Evaluation and generation see clean embeddings.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field

from . import Regularizer, register


def neftune_noise(embeds, alpha: float):
    """``embeds`` (B, L, d) plus uniform noise of magnitude ``alpha / sqrt(L·d)``."""
    import torch
    scale = alpha / math.sqrt(embeds.shape[1] * embeds.shape[2])
    return embeds + torch.empty_like(embeds).uniform_(-scale, scale)


@register
class NEFTune(Regularizer):
    summary: ClassVar[str] = "Uniform noise α/sqrt(L·d) on the input embeddings in training (Jain et al. 2023)."
    name: Literal["neftune"] = "neftune"
    alpha: float = Field(5.0, gt=0, description="Noise scale α: each embedding entry gets Uniform(-1, 1)·α/sqrt(L·d) "
                                                "(L tokens, d dimensions); the paper uses 5 to 15.")

    def apply(self, model) -> None:
        embed = model.get_input_embeddings()
        alpha = self.alpha

        def hook(module, args, out):
            return neftune_noise(out, alpha) if module.training else out

        embed.register_forward_hook(hook)
