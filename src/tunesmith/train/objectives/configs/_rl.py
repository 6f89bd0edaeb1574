"""What the online RL objectives (grpo, rloo, ppo) share: prompts as data, rollouts, rewards, the checks."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ....errors import ConfigError
from .. import ObjectiveConfig


class RewardSpec(BaseModel):
    """One reward function of the sum."""

    model_config = ConfigDict(extra="forbid")
    function: str = Field(description="A built-in (answer, exact_match, format, length_penalty, reward_model) or "
                                      "module:function (see docs/rl.md for the signature).")
    weight: float = Field(1.0, description="Its weight in the total reward Σ weight · reward.")
    name: str | None = Field(None, description="What it is logged as (reward/<name>); default: the function's name.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Keyword arguments for the function (e.g. format's pattern).")


class OnlineConfig(ObjectiveConfig):
    """Objectives that sample completions of the data's prompts from the policy itself and learn from rewards."""

    formats: ClassVar[tuple[str, ...]] = ("prompt",)
    tokenized: ClassVar[str] = "rollout"
    online: ClassVar[bool] = True
    eval_tasks: ClassVar[tuple[str, ...]] = ()
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="The reward functions, summed with their weights (at least one; a "
                                          "reward model: {function: reward_model, options: {run: RUN_DIR}}).")
    num_generations: int = Field(8, ge=1, description="G: completions sampled per prompt.")
    max_tokens: int = Field(256, ge=1, description="Most new tokens of a completion (those cut there are counted "
                                                   "as `truncated`).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (the log-probs "
                                                      "trained on are of the same tempered distribution).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the rollouts (0: off).")
    updates: int = Field(1, ge=1, description="μ: optimizer steps on each rollout batch (the ratio ρ is 1 on the "
                                              "first and moves away on later ones, where clipping acts).")
    eps_low: float = Field(0.2, ge=0, lt=1, description="ε_low: the ratio is clipped below at 1 − ε_low.")
    eps_high: float = Field(0.2, ge=0, description="ε_high: the ratio is clipped above at 1 + ε_high (DAPO uses "
                                                   "0.28).")
    beta: float = Field(0.0, ge=0, description="β: weight of the KL penalty towards the reference policy; 0 needs "
                                               "no reference pass at all.")
    reference_kl: bool = Field(False, description="Log the KL to the reference policy even when β = 0 (one more "
                                                  "forward pass per step; with β > 0 it is always logged).")
    micro_batch: int | None = Field(8, ge=1, description="Completions per forward/backward pass of an update "
                                                         "(the activations held are those of this many, however "
                                                         "large the rollout; null: the whole rollout batch of a "
                                                         "micro-step in one pass).")
    eval_temperature: float = Field(0.0, ge=0, description="Sampling temperature of the evaluation completions "
                                                          "(0: greedy). Their mean reward is logged; the eval "
                                                          "`loss` is minus it.")
    samples: int = Field(8, ge=0, description="Prompts with their completions and rewards written to "
                                              "samples.jsonl at each evaluation.")

    @model_validator(mode="after")
    def _rewards(self):
        if not self.rewards:
            raise ValueError("needs at least one entry in `rewards` (e.g. {function: answer}), see docs/rl.md")
        return self

    def check(self, train_cfg, method_cls, model_kind: str) -> None:
        if model_kind != "decoder":
            raise ConfigError(f"objective.name: {self.name} samples completions from a decoder-only model, and the "
                              f"model is an {model_kind}")
        if getattr(train_cfg, "padding_free", False):
            raise ConfigError(f"train.padding_free: {self.name} pads its rollouts (set train.padding_free: false)")
        import os
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"objective.name: {self.name} runs in one process (its rollouts are not sharded over "
                              "processes); run it without torchrun or --nproc")
        from ....methods.registry import Method
        if method_cls.prepare is not Method.prepare:
            raise ConfigError(f"method.name: {method_cls.name} prepares its masks from static training batches, "
                              f"which objective {self.name} does not have; use another method")
