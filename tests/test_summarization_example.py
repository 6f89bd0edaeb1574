"""examples/make_summarization_data.py and examples/summarize_dolly.yaml (docs/models.md, "A summarization run"):
the summarization rows only, the held-out split of bench/summarization.py, a clear error on a bad row, and a
config that validates and evaluates on the file the script writes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dolly_folder(tmp_path: Path) -> Path:
    def rows(n, prefix):
        return [{"instruction": f"{prefix} {i}", "input": f"paragraph {i}" if i % 3 else "", "output": f"summary {i}",
                 "category": "summarization" if i % 2 == 0 else "open_qa"} for i in range(n)]
    folder = tmp_path / "dolly15k"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(60, "train"))
    write_jsonl(folder / "test.jsonl", rows(6, "test"))
    return folder


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_summarization_rows_with_the_bench_split(tmp_path):
    folder, out = dolly_folder(tmp_path), tmp_path / "out"
    _module(ROOT / "examples" / "make_summarization_data.py").main([str(folder), str(out), "--held-out", "8"])
    train, held = read(out / "train.jsonl"), read(out / "held_out.jsonl")
    assert len(train) == 30 - 5 and len(held) == 8            # 30 + 3 summarization rows; 3 test + 5 from train
    assert [r["instruction"] for r in held[:3]] == ["test 0", "test 2", "test 4"]
    assert all(set(r) == {"instruction", "input", "output"} for r in train + held)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    bench = _module(ROOT / "bench" / "summarization.py")
    b_train, b_test = bench.read_rows(folder)
    b_train, b_held = bench.split(b_train, b_test, 8, 0)
    assert (train, held) == (b_train, b_held[:8])


def test_a_row_without_an_output_is_named(tmp_path):
    folder = dolly_folder(tmp_path)
    rows = read(folder / "train.jsonl")
    del rows[4]["output"]
    write_jsonl(folder / "train.jsonl", rows)
    with pytest.raises(SystemExit, match=r"train\.jsonl:5: summarization row without a text 'output'"):
        _module(ROOT / "examples" / "make_summarization_data.py").main([str(folder), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no train.jsonl"):
        _module(ROOT / "examples" / "make_summarization_data.py").main([str(tmp_path), str(tmp_path / "out")])


def test_config_validates_and_its_files_evaluate_as_generation(tmp_path):
    from tunesmith import config as config_mod
    from tunesmith.eval.runner import EvalOptions, _check
    cfg = config_mod.validate(config_mod.load_yaml(ROOT / "examples" / "summarize_dolly.yaml"), "summarize_dolly.yaml")
    assert cfg.method.name == "lora" and cfg.model.name_or_path == "smollm2-135m"
    assert Path(cfg.data.validation).name == "held_out.jsonl" and Path(cfg.data.train).parent == Path(cfg.data.validation).parent
    out = tmp_path / "out"
    _module(ROOT / "examples" / "make_summarization_data.py").main([str(dolly_folder(tmp_path)), str(out)])
    rows, fmt, task, names, _ = _check(EvalOptions(model="smollm2-135m", data=str(out / "held_out.jsonl")))
    assert (fmt, task.name) == ("alpaca", "generation") and "rouge" in names and len(rows) == 30
