"""EDA (Wei & Zou 2019): each operation does what the paper says, deterministically for a seed; only the
training rows of classification data are augmented."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from helpers import cls_rows, write_jsonl

from tunesmith.data import DataError, DataConfig, build_datasets
from tunesmith.data.augment import augment_rows, eda, random_deletion, random_insertion, random_swap, synonym_replacement
from tunesmith.data.config import EDAConfig
from tunesmith.data.synonyms import STOP_WORDS, SYNONYMS
from tunesmith.models.loader import ModelConfig, load_tokenizer

WORDS = "the film was great and the acting superb but the ending was boring and slow".split()


def rng(seed=0):
    return random.Random(seed)


def test_synonym_replacement_replaces_n_distinct_words_by_a_listed_synonym():
    out = synonym_replacement(WORDS, 2, rng())
    assert len(out) == len(WORDS)
    changed = {(a, b) for a, b in zip(WORDS, out) if a != b}
    assert len({a for a, _ in changed}) == 2
    assert all(a not in STOP_WORDS and b in SYNONYMS[a] for a, b in changed)


def test_random_insertion_adds_n_synonyms_of_words_of_the_sentence():
    out = random_insertion(WORDS, 3, rng())
    added = Counter(out) - Counter(WORDS)
    assert len(out) == len(WORDS) + 3 and sum(added.values()) == 3
    assert all(any(w in SYNONYMS.get(x, []) for x in WORDS) for w in added)
    assert random_insertion("of the".split(), 2, rng()) == ["of", "the"]   # nothing with synonyms: unchanged


def test_random_swap_keeps_the_words_and_moves_at_most_2n():
    out = random_swap(WORDS, 2, rng())
    assert Counter(out) == Counter(WORDS) and 0 < sum(a != b for a, b in zip(WORDS, out)) <= 4


def test_random_deletion_keeps_an_ordered_subsequence_and_at_least_one_word():
    out = random_deletion(WORDS, 0.3, rng())
    it = iter(WORDS)
    assert all(w in it for w in out) and 0 < len(out) < len(WORDS)
    assert len(random_deletion(WORDS, 0.99999, rng())) == 1
    assert random_deletion(["alone"], 0.9, rng()) == ["alone"]


def test_eda_is_deterministic_for_a_seed_and_cycles_the_operations():
    cfg = EDAConfig(num_aug=8)
    text = " ".join(WORDS)
    assert eda(text, cfg, rng(3)) == eda(text, cfg, rng(3)) != eda(text, cfg, rng(4))
    out = eda(text, cfg, rng(3))
    assert [len(t.split()) - len(WORDS) for t in out[:3]] == [0, 2, 0]      # sr, ri (round(0.1·15) = 2), rs
    assert len(out[3].split()) < len(WORDS)                                 # rd
    rows = [(f"f:{i}", {"text": text, "label": i % 2}) for i in range(3)]
    aug = augment_rows(rows, cfg, seed=1)
    assert len(aug) == 3 * 9 and aug[0] == rows[0] and aug[1][0] == "f:0 (eda copy 1)" and aug[1][1]["label"] == 0
    assert aug == augment_rows(rows, cfg, seed=1) and aug != augment_rows(rows, cfg, seed=2)


def test_only_the_training_rows_are_augmented(tmp_path):
    tok = load_tokenizer(ModelConfig(name_or_path="random:bert"))
    path = write_jsonl(tmp_path / "c.jsonl", cls_rows(20))
    cfg = DataConfig(train=str(path), val_split=0.2, augment={"num_aug": 2})
    train, val, report = build_datasets(cfg, tok, max_seq_len=32, objective="cls", seed=0)
    plain, plain_val, _ = build_datasets(DataConfig(train=str(path), val_split=0.2), tok, max_seq_len=32,
                                         objective="cls", seed=0)
    assert len(train) == 3 * len(plain) and len(val) == len(plain_val) == 4 and report.train_rows == 48
    assert [val[i] for i in range(len(val))] == [plain_val[i] for i in range(len(plain_val))]
    assert [train[3 * i] for i in range(len(plain))] == [plain[i] for i in range(len(plain))]
    with pytest.raises(DataError, match="data.augment.*classification"):
        build_datasets(DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}] * 4)),
                                  augment={}), tok, max_seq_len=32, objective="pt", seed=0)
