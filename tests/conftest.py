"""Shared fixtures: the local BERT tokenizer and small data files."""
from __future__ import annotations

import pytest
import torch

from helpers import alpaca_rows, cls_rows, write_jsonl
from tunesmith.models.loader import ModelConfig, load_tokenizer


# Tiny models run fastest on one thread, and a busy machine slows multi-threaded tiny ops badly.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path="random:llama"))


@pytest.fixture
def alpaca_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows())


@pytest.fixture
def cls_file(tmp_path):
    return write_jsonl(tmp_path / "cls.jsonl", cls_rows())
