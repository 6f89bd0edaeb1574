"""Causal language-modelling loss: next-token cross-entropy on unmasked labels (sft and pt).

Two ways to compute the same sum (chosen once, when the objective is built):

* ``LogitsLoss`` (the reference): the model's forward makes the full logits, ``token_ce_sum`` reduces them.
* ``ChunkedLoss``: the decoder's hidden states go through ``kernels.cross_entropy.linear_cross_entropy``,
  which never holds more than one chunk of logits and skips rows whose label is ignored.
  Models whose head is not a plain ``nn.Linear`` (wrapped, soft-capped or scaled logits) use the reference.

``train.chunked_ce`` picks one (``auto``: ``TUNESMITH_CHUNKED_CE=1|0`` when set, else the chunked
loss when CUDA is available). Batches may carry packed-sequence keys (``data.packing``): position_ids and cu_seq_lens_*.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import Objective, register
from .configs.pt import PretrainConfig
from .configs.sft import SFTConfig
from ...data.collate import HOST, on_host
from ...kernels.cross_entropy import IGNORE, labelled_rows, linear_cross_entropy

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids",
              "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy; logits (B, T, V), labels (B, T) with -100 = ignored."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)                               # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B*T,) targets of each position (the next token; ignored at each row's end)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)


def model_inputs(batch: dict) -> dict:
    """The batch keys the model takes; no KV cache is built while computing a training loss."""
    return {"use_cache": False, **{k: batch[k] for k in MODEL_KEYS if k in batch}}


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output projection when logits are exactly ``hidden @ head.weight.T (+ bias)``, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if type(head) is not nn.Linear or not hasattr(model, "get_decoder"):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    return head


class LogitsLoss:
    """Reference: full logits from the model, then ``token_ce_sum``."""

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return token_ce_sum(model(**model_inputs(batch)).logits, batch["labels"])


class ChunkedLoss:
    """Hidden states from the decoder, then the chunked linear cross-entropy over the head
    (``compiled``: its per-chunk softmax and gradient compiled, with ``train.compile``;
    ``chunk_elements``: logits per chunk, ``train.loss_chunk_logits``, None: the kernel's default)."""

    def __init__(self, compiled: bool = False, chunk_elements: int | None = None):
        self.compiled, self.chunk_elements = compiled, chunk_elements

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        head = plain_head(model)
        if head is None:
            return LogitsLoss()(model, batch)
        labels = next_token_labels(batch["labels"])
        host = batch.get(HOST, {}).get("labels")   # the rows to score, found without waiting for the GPU
        rows = "find" if host is None else labelled_rows(next_token_labels(host), labels.device)
        hidden = model.get_decoder()(**model_inputs(batch)).last_hidden_state  # (B, T, d)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels, head.bias,
                                    chunk_elements=self.chunk_elements, compiled=self.compiled, rows=rows)


def default_chunked() -> bool:
    flag = os.environ.get("TUNESMITH_CHUNKED_CE", "").strip()
    return flag == "1" if flag in ("0", "1") else torch.cuda.is_available()


class CausalLM(Objective):
    Config = SFTConfig

    def __init__(self, cfg=None, chunked: bool | None = None):
        super().__init__(cfg)
        self.lm_loss = ChunkedLoss() if (default_chunked() if chunked is None else chunked) else LogitsLoss()

    def configure(self, train_cfg) -> None:
        if train_cfg.chunked_ce != "auto":
            self.lm_loss = ChunkedLoss() if train_cfg.chunked_ce else LogitsLoss()
        if isinstance(self.lm_loss, ChunkedLoss):
            self.lm_loss.compiled = bool(train_cfg.compile)
            self.lm_loss.chunk_elements = train_cfg.loss_chunk_logits

    @property
    def chunked(self) -> bool:
        """Whether the loss goes through the chunked linear cross-entropy."""
        return isinstance(self.lm_loss, ChunkedLoss)

    def count(self, batch):
        return int((on_host(batch, "labels")[:, 1:] != IGNORE).sum())

    def loss(self, model, batch):
        return self.lm_loss(model, batch), self.count(batch), {}

    def uniform_loss(self, model):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        return math.log(vocab) if vocab and vocab > 1 else None


@register
class SFT(CausalLM):
    Config = SFTConfig


@register
class Pretrain(CausalLM):
    Config = PretrainConfig
