"""Padding-free packing (data/packing.py) with document-masked attention (kernels/attention.py), on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import rel_err, tiny
from tunesmith.data.packing import collate_packed, pack_groups, real_tokens
from tunesmith.kernels import attention
from tunesmith.train.objectives.causal_lm import ChunkedLoss, LogitsLoss


def _docs(vocab, lengths=(5, 9, 3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        x = torch.randint(5, vocab, (n,), generator=g).tolist()
        lab = list(x)
        lab[: n // 3] = [-100] * (n // 3)  # a masked prompt
        out.append({"input_ids": x, "labels": lab})
    return out


def test_pack_groups_cover_every_example_once_within_budget():
    lengths = [5, 9, 3, 7, 12, 1, 4]
    groups = pack_groups(lengths, 12, seed=3, epoch=1)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 12 for g in groups)
    assert groups == pack_groups(lengths, 12, seed=3, epoch=1)
    assert groups != pack_groups(lengths, 12, seed=3, epoch=2)


def test_collate_packed_layout():
    batch = collate_packed(_docs(100, (3, 2)))
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3
    assert batch["labels"][0, 0] == -100 and batch["labels"][0, 3] == -100  # each document's first label
    assert real_tokens(batch) == 5


def test_varlen_reference_equals_per_document_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(12, 4, 8, generator=g), torch.randn(12, 2, 8, generator=g), torch.randn(12, 2, 8, generator=g)
    cu = torch.tensor([0, 5, 12])
    out = attention.varlen_attention(q, k, v, cu, 7)
    full = F.scaled_dot_product_attention(q[5:].transpose(0, 1), k[5:].transpose(0, 1).repeat_interleave(2, 0),
                                          v[5:].transpose(0, 1).repeat_interleave(2, 0), is_causal=True)
    assert rel_err(out[5:], full.transpose(0, 1)) < 1e-6


def _per_document_loss(model, docs):
    total = 0.0
    for d in docs:
        x = torch.tensor([d["input_ids"]])
        lab = torch.tensor([d["labels"]])
        total = total + LogitsLoss()(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": lab})
    return total


def test_packed_loss_equals_sum_of_document_losses():
    model = tiny("llama")
    docs = _docs(model.config.vocab_size)
    want = _per_document_loss(model, docs)
    batch = collate_packed(docs)
    sdpa = LogitsLoss()(model, batch)          # transformers' own document mask from position_ids
    attention.enable(model)
    varlen = ChunkedLoss()(model, batch)       # tunesmith_varlen attention
    assert rel_err(sdpa, want) < 1e-5
    assert rel_err(varlen, want) < 1e-5
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(d["input_ids"]) for d in docs], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(d["input_ids"]), dtype=torch.long) for d in docs],
                                           batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(d["labels"]) for d in docs], batch_first=True,
                                             padding_value=-100)
    padded_loss = LogitsLoss()(model, {"input_ids": padded, "attention_mask": mask, "labels": labels})
    assert rel_err(padded_loss, want) < 1e-5  # padded batches still use SDPA with the padding mask


def test_packed_batches_reach_attention_without_a_dense_mask(monkeypatch):
    """transformers builds no (T, T) mask for a packed batch: attention gets the 4-D placeholder, and the
    loss is still the documents' own; enable twice leaves one hook."""
    seen = []
    real = attention.attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append(None if mask is None else tuple(mask.shape))
        return real(module, q, k, v, mask, **kw)
    monkeypatch.setattr(attention, "attention_forward", spy)
    model = tiny("llama")
    docs = _docs(model.config.vocab_size)
    want = _per_document_loss(model, docs)
    attention.enable(model)
    attention.enable(model)
    batch = collate_packed(docs)
    seen.clear()
    assert rel_err(LogitsLoss()(model, batch), want) < 1e-5
    assert rel_err(ChunkedLoss()(model, batch), want) < 1e-5      # through model.get_decoder() alone
    assert seen and set(seen) == {attention.PACKED}
    assert len(model.get_decoder()._forward_pre_hooks) == 1
