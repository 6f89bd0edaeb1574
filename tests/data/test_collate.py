"""collate padding and masks; batch_indices determinism and coverage."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data import batch_indices, collate, pad_id_for


def test_lm_batch_right_pads_ids_masks_and_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(examples, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_pad_to_multiple_of():
    b = collate([{"input_ids": [1] * 5, "labels": [1] * 5}], pad_id=9, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (1, 8) and b["input_ids"][0, 5:].tolist() == [9, 9, 9]
    assert b["attention_mask"].sum().item() == 5 and b["labels"][0, 5:].tolist() == [-100] * 3


def test_classification_batch():
    b = collate([{"input_ids": [1, 2], "label": 3}, {"input_ids": [4], "label": 0}], pad_id=0)
    assert b["label"].tolist() == [3, 0] and b["label"].dtype == torch.long
    assert set(b) == {"input_ids", "attention_mask", "label"}


def test_preference_batch_pads_chosen_and_rejected_to_one_length():
    ex = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
           "rejected_input_ids": [1, 4], "rejected_labels": [-100, 4]}]
    b = collate(ex, pad_id=0)
    assert set(b) == {"chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                      "rejected_input_ids", "rejected_attention_mask", "rejected_labels"}
    assert b["rejected_input_ids"].tolist() == [[1, 4, 0]]
    assert b["rejected_attention_mask"].tolist() == [[1, 1, 0]]
    assert b["rejected_labels"].tolist() == [[-100, 4, -100]]
    assert b["chosen_attention_mask"].tolist() == [[1, 1, 1]]


def test_pad_id_for(bert_tok):
    assert pad_id_for(bert_tok) == bert_tok.pad_token_id

    class NoPad:
        pad_token_id, eos_token_id = None, 7

    assert pad_id_for(NoPad()) == 7


@pytest.mark.parametrize("n,bs", [(10, 3), (12, 4), (1, 5), (0, 2)])
def test_batch_indices_cover_every_index_once(n, bs):
    batches = batch_indices(n, bs, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(len(b) == bs for b in batches[:-1])
    assert len(batches) == -(-n // bs)


def test_batch_indices_deterministic_per_seed_and_epoch():
    a = batch_indices(50, 8, seed=1, epoch=2)
    assert a == batch_indices(50, 8, seed=1, epoch=2)
    assert a != batch_indices(50, 8, seed=1, epoch=3)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert [i for b in a for i in b] == perm  # resumable: same generator recipe (seed + epoch)


def test_batch_indices_no_shuffle_and_drop_last():
    assert batch_indices(7, 3, seed=0, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6]]
    dropped = batch_indices(7, 3, seed=0, epoch=0, drop_last=True)
    assert len(dropped) == 2 and all(len(b) == 3 for b in dropped)
    with pytest.raises(ValueError):
        batch_indices(7, 0, seed=0, epoch=0)
