"""What the preference objectives share: the pair data they read and the checks of the run."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ....errors import ConfigError
from .. import ObjectiveConfig


class PairConfig(ObjectiveConfig):
    """Objectives on (prompt, chosen, rejected) rows: the policy's per-sequence log-probs of both."""

    formats: ClassVar[tuple[str, ...]] = ("preference",)
    tokenized: ClassVar[str] = "pair"
    packing: ClassVar[bool] = True
    chunked_ce: ClassVar[bool] = True

    def check(self, train_cfg, method_cls, model_kind: str) -> None:
        if model_kind != "decoder":
            raise ConfigError(f"objective.name: {self.name} trains a causal LM's log-probabilities, and the model "
                              f"is an {model_kind}; use a decoder-only model (or objective rm for a reward model)")


class ReferenceConfig(PairConfig):
    """Objectives that compare the policy with a reference policy (the model before training)."""

    beta: float = Field(0.1, gt=0, description="β: strength of the pull towards the reference policy (the "
                                               "rewards are β × log π/π_ref).")
    precompute_reference: bool = Field(
        False, description="Compute the reference log-probs once before training and cache them on disk "
                           "($TUNESMITH_CACHE/reference, keyed by the model and the tokenized data; later runs on "
                           "the same model and data reuse them), instead of a reference pass every step. Adapter "
                           "and prompt methods otherwise use the model with the adapter disabled, full, freeze "
                           "and selective methods a frozen copy of the model.")
