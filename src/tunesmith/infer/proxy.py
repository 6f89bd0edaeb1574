"""Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy"), a decoding-time method.

At every step the base model M's next-token logits are shifted by the difference between a small
tuned expert M⁺ and its untuned version M⁻ (§2, eq. 1):

    p̃(x_t | x_<t) = softmax(s_M + α (s_M⁺ − s_M⁻)),

with α = 1 in the paper's main results (α is its §5 knob). The three models must share a
vocabulary (the same tokenizer); when their embedding tables are padded to different sizes the
logits are compared on the common prefix of ids. Any causal LM works as any of the three,
including a tunesmith run loaded with ``tunesmith.load`` (virtual-token methods included). Each
model keeps its own KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.compat import cache_kwargs


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded 2-D mask: 0.. for real tokens, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class Sampler:
    """Greedy when ``do_sample`` is false; otherwise temperature and nucleus (top-p) sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next ids (B,) from logits (B, V)."""
        if not self.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / max(self.temperature, 1e-6), dim=-1)
        if self.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p   # (B, V): the nucleus, at least one id
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class ProxyTuned:
    """The combined model M + α (M⁺ − M⁻) over next-token logits."""

    def __init__(self, base: nn.Module, expert: nn.Module, anti_expert: nn.Module, alpha: float = 1.0):
        self.models = (base, expert, anti_expert)
        self.alpha = alpha
        self.vocab = min(m.get_output_embeddings().weight.shape[0] for m in self.models)

    def combine(self, base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
        v = self.vocab
        return base[..., :v].float() + self.alpha * (expert[..., :v].float() - anti[..., :v].float())

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Combined logits (B, T, V) of a full forward pass of each model."""
        outs = [m(input_ids=input_ids.to(_device(m)),
                  attention_mask=None if attention_mask is None else attention_mask.to(_device(m))).logits
                for m in self.models]
        return self.combine(*(o.to(input_ids.device) for o in outs))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 sampler: Sampler, eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
        """Decode from left-padded prompts; returns prompts + new ids (B, T + new), padded after EOS."""
        from transformers import DynamicCache
        for m in self.models:
            m.eval()
        caches = [DynamicCache(config=m.config) for m in self.models]
        ids, mask, step_ids = input_ids, attention_mask, input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            pos = positions(mask)[:, -step_ids.shape[1]:]
            outs = [m(input_ids=step_ids.to(_device(m)), attention_mask=mask.to(_device(m)),
                      position_ids=pos.to(_device(m)), use_cache=True, **cache_kwargs(m, c)).logits[:, -1]
                    for m, c in zip(self.models, caches)]
            nxt = sampler(self.combine(*(o.to(ids.device) for o in outs)))
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            step_ids = nxt[:, None]
            if bool(done.all()):
                break
        return ids


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
