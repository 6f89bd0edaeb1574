"""Test helpers: tiny random models, small data, comparisons. Import as `from helpers import ...`."""
from __future__ import annotations

import contextlib
import json
import os
import random

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunesmith.models.loader import ModelConfig, load_model, load_tokenizer  # noqa: E402


def tiny(arch: str = "llama", task: str = "causal_lm", seed: int = 0, num_labels: int = 2, **overrides):
    """A tiny randomly initialised model (fp32, CPU)."""
    cfg = ModelConfig(name_or_path=f"random:{arch}", device="cpu", dtype="float32", random_overrides=overrides)
    return load_model(cfg, task=task, num_labels=num_labels, seed=seed)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int = 48, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."})
    return rows


def preference_rows(n: int = 32, seed: int = 0):
    """Preference pairs whose chosen response repeats the prompt's word and whose rejected one does not."""
    import random
    rng = random.Random(seed)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    rows = []
    for i in range(n):
        w, other = rng.sample(words, 2)
        rows.append({"prompt": f"Say {w} twice.", "chosen": f"{w} {w}", "rejected": f"{other} {rng.choice(words)}",
                     "margin": float(i % 3)})
    return rows


def cls_rows(n: int = 48, seed: int = 0):
    rng = random.Random(seed)
    pos, neg = ["great", "lovely", "superb", "fine"], ["awful", "bad", "dull", "poor"]
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(pos if label else neg)
        rows.append({"text": f"the film was {word} and {rng.choice(pos if label else neg)}", "label": label})
    return rows


def ids(batch: int = 2, length: int = 12, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (batch, length), generator=g)


class OnDevice(torch.Tensor):
    """A tensor whose values the host may not read, as it could not read a GPU tensor's without
    waiting for the GPU (``int``, ``bool``, ``item``, ``nonzero``, ``tolist``, ``bincount`` raise)."""
    READS = {"__int__", "__bool__", "__float__", "item", "nonzero", "tolist", "bincount"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in cls.READS:
            raise AssertionError(f"{func.__name__} read a device tensor on the host")
        return super().__torch_function__(func, types, args, kwargs or {})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run_config(train_file, tmp_path, method: dict, model: str = "random:llama", **train):
    """A small RunConfig dict for end-to-end tests."""
    t = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64, "progress": False}
    t.update(train)
    return {"model": {"name_or_path": model, "device": "cpu"}, "method": method,
            "data": {"train": str(train_file)}, "train": t, "output": {"dir": str(tmp_path / "run"), "plot": False}}


# What peft itself raises where it cannot run a method on the installed transformers (not a tunesmith
# failure): the parity test then skips, naming both versions, and tunesmith's own reference tests still run.
PEFT_CANNOT_RUN = ("Model does not support past key values",)


@contextlib.contextmanager
def peft_oracle(what: str):
    """Run peft as an oracle for ``what``; skip with both versions named when peft cannot run it here."""
    try:
        yield
    except ValueError as e:
        if not any(m in str(e) for m in PEFT_CANNOT_RUN):
            raise
        import peft
        import transformers
        pytest.skip(f"peft {peft.__version__} cannot run {what} on transformers {transformers.__version__} "
                    f"({e}); tunesmith's own reference tests for it still run")


def kto_rows(n: int = 24, seed: int = 0):
    """Unpaired rows: a completion that repeats the prompt's word is desirable."""
    rng = random.Random(seed)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    rows = []
    for i in range(n):
        w, other = rng.sample(words, 2)
        good = i % 2 == 0
        rows.append({"prompt": f"Say {w} twice.", "completion": f"{w} {w}" if good else f"{other} {w}", "label": good})
    return rows
