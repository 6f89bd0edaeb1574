"""P-tuning (Liu et al. 2021, "GPT Understands, Too"), v1.

The virtual-token embeddings are produced by a prompt encoder from trained inputs
e_0..e_{n-1} (§3.2): h_i = MLP([LSTM→(e_{0:i}); LSTM←(e_{i:n})]), a bidirectional LSTM and a
two-layer ReLU MLP; or, as HF peft also offers, a three-layer ReLU MLP on e_i. The encoder's
output depends on no input, so after training it is folded into an (n, d) table: the artifact
and inference pay nothing for it. Module names match peft's PromptEncoder (embedding,
lstm_head, mlp_head), so weights copy across.
"""
from __future__ import annotations

import torch
from torch import nn

from ._prompting import InputPromptMethod
from ._virtual import InputPrompt, dims
from .registry import register
from .configs.ptuning import PtuningConfig


class LstmPromptEncoder(InputPrompt):
    """h = MLP(BiLSTM(e)): LSTM hidden k per direction, MLP 2k → 2k → d."""

    def __init__(self, n: int, d: int, k: int):
        super().__init__(n)
        self.embedding = nn.Embedding(n, d)
        self.lstm_head = nn.LSTM(input_size=d, hidden_size=k, num_layers=2, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * k, 2 * k), nn.ReLU(), nn.Linear(2 * k, d))

    def table(self) -> torch.Tensor:
        e = self.embedding.weight.unsqueeze(0)             # (1, n, d)
        return self.mlp_head(self.lstm_head(e)[0])[0]      # (n, d)


class MlpPromptEncoder(InputPrompt):
    """h = W3 ReLU(W2 ReLU(W1 e)): d → k → k → d."""

    def __init__(self, n: int, d: int, k: int):
        super().__init__(n)
        self.embedding = nn.Embedding(n, d)
        self.mlp_head = nn.Sequential(nn.Linear(d, k), nn.ReLU(), nn.Linear(k, k), nn.ReLU(), nn.Linear(k, d))

    def table(self) -> torch.Tensor:
        return self.mlp_head(self.embedding.weight)        # (n, d)


ENCODERS = {"lstm": LstmPromptEncoder, "mlp": MlpPromptEncoder}


@register
class Ptuning(InputPromptMethod):
    Config = PtuningConfig
    peft_type = "P_TUNING"
    invariant_cases = InputPromptMethod.invariant_cases + [{"options": {"encoder": "mlp", "encoder_hidden": 16}}]

    def make(self, model: nn.Module) -> InputPrompt:
        d = dims(model)["hidden"]
        return ENCODERS[self.cfg.encoder](self.cfg.num_virtual_tokens, d, self.cfg.encoder_hidden or d)

    def peft_fields(self, model: nn.Module) -> dict:
        return {"encoder_reparameterization_type": self.cfg.encoder.upper(),
                "encoder_hidden_size": self.cfg.encoder_hidden or dims(model)["hidden"],
                "encoder_num_layers": 2, "encoder_dropout": 0.0}

    @classmethod
    def config_from_peft(cls, peft_cfg: dict):
        return cls.Config(name=cls.name, num_virtual_tokens=peft_cfg["num_virtual_tokens"],
                          encoder=str(peft_cfg.get("encoder_reparameterization_type", "MLP")).lower(),
                          encoder_hidden=peft_cfg.get("encoder_hidden_size"))


def ptuning_trainable_count(n: int, d: int, k: int, encoder: str) -> int:
    """Closed form of the encoder's parameters (embedding + LSTM/MLP)."""
    if encoder == "mlp":
        return n * d + (d * k + k) + (k * k + k) + (k * d + d)
    lstm = 2 * (4 * k * (d + k) + 8 * k) + 2 * (4 * k * (2 * k + k) + 8 * k)  # 2 layers × 2 directions
    return n * d + lstm + (4 * k * k + 2 * k) + (2 * k * d + d)
