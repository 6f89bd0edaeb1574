"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

n trained embeddings P ∈ R^{n×d} are prepended to the embedded input, [P; E(x)] (§2); the model
is frozen. Initialisation (§3.2): from the embeddings of ``init_text`` (tokenized with the base
model's tokenizer, repeated or cut to n tokens, as HF peft's TEXT init), or, without a text, the
embeddings of n tokens sampled uniformly from the vocabulary ("sampled vocab"), which keeps the
prompts at the scale of real token embeddings.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ._prompting import InputPromptMethod
from ._virtual import PromptTable, dims
from .registry import register
from .configs.prompt import PromptConfig


def tokenizer_for(model: nn.Module):
    """The tokenizer of ``model``'s checkpoint (the test tokenizer for random tiny models)."""
    from ..models.loader import ModelConfig, load_tokenizer
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return load_tokenizer(ModelConfig(name_or_path=str(name) if name else "random:llama"))


def text_token_ids(model: nn.Module, text: str, n: int) -> list[int]:
    """``text``'s token ids (with special tokens, as peft), repeated or cut to ``n``."""
    ids = tokenizer_for(model)(text)["input_ids"]
    return (ids * math.ceil(n / len(ids)))[:n]


@register
class Prompt(InputPromptMethod):
    Config = PromptConfig
    peft_type = "PROMPT_TUNING"

    def make(self, model: nn.Module) -> PromptTable:
        n = self.cfg.num_virtual_tokens
        emb = model.get_input_embeddings()
        if self.cfg.init_text is not None:
            ids = torch.tensor(text_token_ids(model, self.cfg.init_text, n))
            if int(ids.max()) >= emb.weight.shape[0]:
                raise ConfigError(f"method.init_text: {self.cfg.init_text!r} tokenizes to id {int(ids.max())}, "
                                  f"outside this model's {emb.weight.shape[0]} embeddings (tokenizer/model "
                                  "mismatch); set init_text to null")
        else:
            ids = torch.randint(0, emb.weight.shape[0], (n,))
        with torch.no_grad():
            init = emb.weight[ids.to(emb.weight.device)].float().clone()
        return PromptTable(n, dims(model)["hidden"], init=init)

    def encoder_params(self, model: nn.Module) -> int:
        return prompt_trainable_count(model, self.cfg.num_virtual_tokens)

    def peft_fields(self, model: nn.Module) -> dict:
        # the saved prompts are trained; how they were initialised is in tunesmith.json
        return {"prompt_tuning_init": "RANDOM"}


def prompt_trainable_count(model: nn.Module, n: int) -> int:
    """Closed form: n · d."""
    return n * dims(model)["hidden"]
