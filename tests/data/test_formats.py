"""Format detection, row validation messages, objective/format pairing, config errors, skipping."""

from __future__ import annotations

import pydantic
import pytest

from tunesmith.data import DataConfig, DataError, build_datasets
from tunesmith.data.formats import detect_format
from tunesmith.data.readers import Row

ROWS = {
    "alpaca": {"instruction": "Say hi.", "input": "", "output": "Hi."},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    "text": {"text": "Some plain text."},
    "classification": {"text": "great film", "label": 1},
    "preference": {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
}
OBJECTIVE = {"alpaca": "sft", "messages": "sft", "sharegpt": "sft", "text": "pt",
             "classification": "cls", "preference": "dpo"}


def _build(path, tok, objective="sft", **cfg):
    cfg.setdefault("val_split", 0)
    return build_datasets(DataConfig(train=path, **cfg), tok, max_seq_len=64, objective=objective, seed=0)


@pytest.mark.parametrize("fmt", list(ROWS))
def test_auto_detects_each_format(write, bert_tok, fmt):
    assert detect_format(Row("f:1", ROWS[fmt])) == fmt
    rows = [ROWS[fmt]] * 2
    if fmt == "classification":
        rows = [ROWS[fmt], {"text": "bad film", "label": 0}]
    _, _, report = _build(write("d.jsonl", rows), bert_tok, OBJECTIVE[fmt])
    assert report.format == fmt
    assert report.train_rows >= 1


def test_sentence_key_detects_classification():
    assert detect_format(Row("f:1", {"sentence": "x", "label": "pos"})) == "classification"


def test_undetectable_format_lists_expected_keys(write, bert_tok):
    path = write("odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        _build(path, bert_tok)
    msg = str(err.value)
    assert "odd.jsonl:1" in msg and "['answer', 'question']" in msg
    assert "alpaca: instruction, input (optional), output" in msg and "preference:" in msg


def test_field_map_renames_source_keys(write, bert_tok):
    path = write("gsm.jsonl", [{"question": "1+1?", "answer": "2", "chosen": "ignored"}] * 3)
    _, _, report = _build(path, bert_tok, field_map={"question": "instruction", "answer": "output"},
                          format="alpaca")
    assert report.format == "alpaca" and report.train_rows == 3


def test_missing_field_names_file_line_field_and_format(write, bert_tok):
    path = write("a.jsonl", [ROWS["alpaca"], {"instruction": "x", "input": ""}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: missing field 'output' \(format alpaca expects "
                                        r"instruction, input \(optional\), output\)"):
        _build(path, bert_tok)


def test_wrong_type_names_field_found_and_expected(write, bert_tok):
    path = write("a.jsonl", [ROWS["alpaca"], ROWS["alpaca"], {"instruction": "x", "output": 5}])
    with pytest.raises(DataError, match=r"a\.jsonl:3: field 'output' has type int \(value 5\), expected str"):
        _build(path, bert_tok)


def test_bad_role_in_messages(write, bert_tok):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    path = write("m.jsonl", [ROWS["messages"], bad])
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'messages\[1\]\.role' has value 'bot', "
                                        r"expected one of system, user, assistant"):
        _build(path, bert_tok)


def test_csv_wrong_type_uses_csv_line_numbers(write, bert_tok):
    path = write("c.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": ""}])
    with pytest.raises(DataError, match=r"c\.csv:3: missing field 'label'|c\.csv:3: field 'label'"):
        _build(path, bert_tok, objective="cls")


def test_unknown_format_is_rejected_by_config():
    with pytest.raises(pydantic.ValidationError) as err:
        DataConfig(train="x.jsonl", format="xml")
    msg = str(err.value)
    assert "format" in msg and "'alpaca'" in msg and "'preference'" in msg


@pytest.mark.parametrize("bad", [{"val_split": 1.0}, {"val_split": -0.1}, {"max_rows": 0},
                                 {"packing": True, "format": "alpaca"}, {"field_map": {"q": "question"}},
                                 {"label_names": ["a", "a"]}, {"bogus": 1}])
def test_config_rejects_bad_settings(bad):
    with pytest.raises(pydantic.ValidationError):
        DataConfig(train="x.jsonl", **bad)


def test_config_fields_are_documented():
    assert all(f.description for f in DataConfig.model_fields.values())


@pytest.mark.parametrize("fmt,objective", [("alpaca", "cls"), ("classification", "sft"),
                                           ("text", "sft"), ("preference", "pt"), ("alpaca", "dpo")])
def test_incompatible_objective_and_format(write, bert_tok, fmt, objective):
    path = write("d.jsonl", [ROWS[fmt]] * 2)
    with pytest.raises(DataError) as err:
        _build(path, bert_tok, objective)
    msg = str(err.value)
    assert f"format {fmt!r}" in msg and f"objective {objective!r}" in msg and "takes format" in msg


def test_unknown_objective(write, bert_tok):
    with pytest.raises(DataError, match="unknown objective 'nosuch'.*sft"):
        _build(write("d.jsonl", [ROWS["alpaca"]]), bert_tok, "nosuch")


def test_packing_needs_text(write, bert_tok):
    path = write("d.jsonl", [ROWS["alpaca"]] * 2)
    with pytest.raises(DataError, match="packing=true needs format text.*'alpaca'"):
        _build(path, bert_tok, "pt", packing=True)


def test_missing_file_names_path(bert_tok):
    with pytest.raises(DataError, match=r"train file not found: 'no/such\.jsonl'"):
        _build("no/such.jsonl", bert_tok)


def test_skip_counts_bad_rows_and_keeps_first_messages(write, bert_tok):
    rows = [ROWS["alpaca"]] * 3 + [{"instruction": "x"}] * 12 + [{"instruction": 1, "output": "y"}]
    path = write("s.jsonl", rows)
    _, _, report = _build(path, bert_tok, on_error="skip")
    assert report.train_rows == 3 and report.skipped == 13
    assert len(report.skipped_reasons) == 10
    assert report.skipped_reasons[0].startswith(f"{path}:4: missing field 'output'")


def test_skip_with_every_row_bad_is_still_an_error(write, bert_tok):
    path = write("allbad.jsonl", [{"instruction": "x"}] * 3 + [{"instruction": "y", "output": 3}])
    with pytest.raises(DataError, match=r"allbad\.jsonl: every row is invalid.*allbad\.jsonl:1: missing field"):
        _build(path, bert_tok, on_error="skip", format="alpaca")


def test_preference_row_errors(write, bert_tok):
    path = write("p.jsonl", [ROWS["preference"], {"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'prompt' \(format preference expects"):
        _build(path, bert_tok, "rm")
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write("q.jsonl", [{"prompt": "q", "chosen": turns, "rejected": "b"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: fields 'chosen' and 'rejected' must both be str"):
        _build(path, bert_tok, "dpo")


def test_messages_without_assistant_turn(write, bert_tok):
    path = write("m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'messages' has no assistant turn"):
        _build(path, bert_tok)
