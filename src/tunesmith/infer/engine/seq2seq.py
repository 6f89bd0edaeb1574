"""Encoder-decoders (T5, mT5, Flan-T5, BART) in the engine: the prompt goes through the encoder once,
the decoder starts from the model's decoder start token and decodes with transformers' own
``EncoderDecoderCache`` (its self-attention keys grow a column a step; the cross-attention keys are the
encoder's, computed at the first step).

The rows of a batch start together (``can_merge`` is False: the engine admits new rows once the batch
is empty), so every row's decoder sits at the same position; finished rows leave through the cache's
own row selection. Per-row LoRA adapters (``table``) apply to the encoder's and the decoder's
projections alike, each row its own. Greedy tokens equal ``model.generate``
(tests/infer/test_engine_seq2seq.py).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...errors import ConfigError
from ...models.compat import cache_kwargs, output_cache
from ..generate import left_pad
from .runner import device_of


def decoder_start(model: nn.Module) -> int:
    """The token the decoder starts from (T5: pad; BART: eos), from the config or the generation config."""
    for cfg in (getattr(model, "generation_config", None), model.config):
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ConfigError(f"engine: {type(model).__name__}'s config has no decoder_start_token_id to decode from")


class Seq2SeqRunner:
    """An encoder-decoder's batch: ``prefill`` encodes and takes the first decoder step, ``decode`` the next."""

    can_merge = False

    def __init__(self, model: nn.Module, pad_id: int = 0, table=None):
        self.model = model.eval()
        self.table = table
        self.device = device_of(model)
        self.pad_id = pad_id
        self.start = decoder_start(model)
        self.encoded = self.enc_mask = self.cache = self.slots = None
        self.slot_list: list[int] = []

    @property
    def rows(self) -> int:
        return 0 if self.enc_mask is None else self.enc_mask.shape[0]

    def _bind(self):
        if self.table is None:
            return contextlib.nullcontext()
        return self.table.bind(self.slots, any(s >= 0 for s in self.slot_list))

    def _step(self, dec_ids: torch.Tensor) -> torch.Tensor:
        with self._bind():
            out = self.model(encoder_outputs=self.encoded, attention_mask=self.enc_mask, decoder_input_ids=dec_ids,
                             use_cache=True, **cache_kwargs(self.model, self.cache))
        self.cache = output_cache(out)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        if self.rows:
            raise RuntimeError("an encoder-decoder batch takes new rows only when it is empty")
        ids, mask = left_pad(prompts, self.pad_id, right=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.slot_list = list(slots)
        self.slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        with self._bind():
            self.encoded = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)
        self.enc_mask, self.cache = mask, None
        return self._step(torch.full((len(prompts), 1), self.start, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def decode(self, last: list[int]) -> torch.Tensor:
        return self._step(torch.tensor(last, dtype=torch.long, device=self.device)[:, None])

    def keep(self, idx: list[int]) -> None:
        if len(idx) == self.rows:
            return
        self.slot_list = [self.slot_list[i] for i in idx]
        if not idx:
            self.encoded = self.enc_mask = self.cache = self.slots = None
            return
        index = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.enc_mask, self.slots = self.enc_mask[index], self.slots[index]
        self.encoded["last_hidden_state"] = self.encoded["last_hidden_state"][index]
