"""Data through the datasets library, on local files only (HF_HUB_OFFLINE is set by helpers): a folder of
data files, a save_to_disk folder, streaming, a split as validation; a name that cannot load is one DataError."""
from __future__ import annotations

import pytest

from helpers import alpaca_rows, write_jsonl

from tunesmith.data import DataConfig, DataError, build_datasets
from tunesmith.data.hub import is_datasets_source
from tunesmith.data.readers import read_rows
from tunesmith.models.loader import ModelConfig, load_tokenizer


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", alpaca_rows(20))
    write_jsonl(d / "test.jsonl", alpaca_rows(6, seed=1))
    return d


def test_a_folder_of_data_files_reads_like_the_files(folder, tmp_path):
    assert is_datasets_source(str(folder)) and not is_datasets_source(str(folder / "train.jsonl"))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("plain text")
    assert not is_datasets_source(str(tmp_path / "txt"))          # a folder of .txt files stays a text corpus
    direct = [r.data for r in read_rows(str(folder / "train.jsonl"))]
    for streaming in (False, True):
        rows = read_rows(str(folder), source={"split": "train", "streaming": streaming})
        assert [r.data for r in rows] == direct and rows[0].loc == f"{folder}[train]: row 1"
    test = read_rows(str(folder), source={"split": "test"})
    assert [r.data for r in test] == [r.data for r in read_rows(str(folder / "test.jsonl"))]


def test_a_saved_dataset_and_a_split_as_validation(folder, tmp_path):
    import datasets
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca_rows(12)),
                          "validation": datasets.Dataset.from_list(alpaca_rows(3, seed=2))}).save_to_disk(str(saved))
    tok = load_tokenizer(ModelConfig(name_or_path="random:llama"))
    train, val, report = build_datasets(DataConfig(train=str(saved), hf_validation_split="validation"), tok,
                                        max_seq_len=64, objective="sft", seed=0)
    assert (len(train), len(val), report.rows_read) == (12, 3, 15)
    files, files_val, _ = build_datasets(DataConfig(train=str(folder), hf_validation_split="test"), tok,
                                         max_seq_len=64, objective="sft", seed=0)
    ref, ref_val, _ = build_datasets(DataConfig(train=str(folder / "train.jsonl"),
                                                validation=str(folder / "test.jsonl")), tok,
                                     max_seq_len=64, objective="sft", seed=0)
    assert [files[i] for i in range(len(files))] == [ref[i] for i in range(len(ref))]
    assert [files_val[i] for i in range(len(files_val))] == [ref_val[i] for i in range(len(ref_val))]
    with pytest.raises(DataError, match=r"saved dataset has no split 'dev' \(data.hf_split\)"):
        read_rows(str(saved), source={"split": "dev"})


def test_a_name_that_cannot_load_is_one_data_error():
    assert is_datasets_source("someone/not-a-local-dataset")
    with pytest.raises(DataError, match=r"someone/not-a-local-dataset: the datasets library cannot load split 'train'"):
        read_rows("someone/not-a-local-dataset")
    with pytest.raises(DataError, match="data file not found"):
        read_rows("missing.jsonl")
