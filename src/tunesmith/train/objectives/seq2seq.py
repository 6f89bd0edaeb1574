"""Sequence-to-sequence loss for encoder-decoders (T5, mT5, Flan-T5, BART): the encoder reads the source,
the decoder is teacher-forced on the target shifted right, and the loss is the summed cross-entropy of
every target token (labels on the decoder side; nothing in the source is masked, none of it is a label).

    L = − Σ_t log p(y_t | y_<t, x),      decoder input = [start, y_1 … y_{T−1}]

The decoder input comes from the model's own ``prepare_decoder_input_ids_from_labels`` (its decoder
start token, padding where a label is ignored), so that it is what the model's ``labels=`` path builds.
Batches hold ``input_ids``/``attention_mask`` (the source) and ``decoder_labels`` (the target, padded with
-100): :mod:`tunesmith.data.seq2seq`.
"""
from __future__ import annotations

import torch.nn.functional as F

from . import Objective, register
from .configs.seq2seq import Seq2SeqConfig
from ...data.collate import on_host
from ...data.seq2seq import LABELS
from ...kernels.cross_entropy import IGNORE


@register
class Seq2Seq(Objective):
    Config = Seq2SeqConfig

    def count(self, batch):
        return int((on_host(batch, LABELS) != IGNORE).sum())

    def loss(self, model, batch):
        labels = batch[LABELS]                                                  # (B, T_dec)
        decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_ids, use_cache=False).logits   # (B, T_dec, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, self.count(batch), {}
