"""Config of the ``rm`` objective (a Bradley–Terry reward model)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ....errors import ConfigError
from .. import ObjectiveConfig, register_config


@register_config
class RewardConfig(ObjectiveConfig):
    summary: ClassVar[str] = ("Reward model: Bradley–Terry loss on a scalar head over the last real token "
                              "(causal LMs and encoders).")
    task: ClassVar[str] = "classification"
    num_labels: ClassVar[int | None] = 1
    formats: ClassVar[tuple[str, ...]] = ("preference",)
    tokenized: ClassVar[str] = "pair"
    name: Literal["rm"] = "rm"
    margin: bool = Field(False, description="Subtract each row's `margin` field (a number, how much better chosen "
                                            "is) inside the loss: −log σ(r_c − r_r − m) (Llama 2's margin term).")
    center_rewards: float | None = Field(
        None, ge=0.0, description="Weight of (r_c + r_r)² added to the loss, which keeps the rewards centred on 0 "
                                  "(Eisenstein et al. 2023); null: none.")

    def check(self, train_cfg, method_cls, model_kind: str) -> None:
        if model_kind == "encoder-decoder":
            raise ConfigError("objective.name: rm needs a decoder-only model or an encoder with a scalar head, "
                              "and the model is an encoder-decoder")
