"""No silent data loss: truncation keeps the response, every cut and drop is counted and reported,
empty fields, bad UTF-8 and unreadable lines are refused (or skipped and counted), .txt corpora read."""

from __future__ import annotations

import json
import re

import pytest

from tunesmith.data import DataConfig, DataError, build_datasets
from tunesmith.data.readers import read_rows
from tunesmith.data.truncate import fit, response_start

IGNORE = -100
PROMPT, RESPONSE = list(range(10)), [100, 101, 102, 103, 104]
IDS = PROMPT + RESPONSE + [200]                      # 200: a masked newline after the answer's end
LABELS = [IGNORE] * 10 + RESPONSE + [IGNORE]


def build(tmp_path, rows, tok, max_seq_len=256, objective="sft", name="d.jsonl", **cfg):
    cfg.setdefault("val_split", 0)
    path = tmp_path / name
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return build_datasets(DataConfig(train=str(path), **cfg), tok, max_seq_len=max_seq_len,
                          objective=objective, seed=0)


def trained(labels):
    return [t for t in labels if t != IGNORE]


# ---- the truncation policy ------------------------------------------------------------------------
def test_response_starts_at_the_last_trained_run():
    assert response_start(LABELS) == 10
    two_turns = [IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, IGNORE]
    assert response_start(two_turns) == 5
    assert response_start([IGNORE] * 4) == 4 and response_start([1, 2, 3]) == 0


@pytest.mark.parametrize("policy, expected", [
    ("middle", [0, 1, 8, 9] + RESPONSE + [200]),   # the prompt's start and end, the whole response
    ("left", [6, 7, 8, 9] + RESPONSE + [200]),     # the prompt's end, the whole response
    ("right", IDS[:10]),                            # the row's start: the response is lost
])
def test_policies_cut_the_prompt_and_keep_the_response(policy, expected):
    ids, labels, cut = fit(IDS, LABELS, 10, policy)
    assert cut and ids == expected and len(labels) == len(ids)
    assert labels == [IGNORE if t < 100 or t == 200 else t for t in ids]
    assert fit(IDS, LABELS, len(IDS), policy) == (IDS, LABELS, False)


def test_response_share_limits_a_long_response():
    ids, labels = list(range(8)) + list(range(100, 120)), [IGNORE] * 8 + list(range(100, 120))
    out, lab, _ = fit(ids, labels, 10, "middle", response_share=0.5)
    assert out == [0, 1, 2, 6, 7, 100, 101, 102, 103, 104]   # 5 prompt tokens, the response's first 5
    short_prompt = list(range(3)) + list(range(100, 120))
    out, _, _ = fit(short_prompt, [IGNORE] * 3 + list(range(100, 120)), 10, "middle", response_share=0.5)
    assert out == [0, 1, 2] + list(range(100, 107))           # a short prompt leaves the room to the response
    pt = list(range(30))
    assert fit(pt, pt, 10, "middle")[0] == pt[:10]             # trained everywhere: cut at the end


def long_context_rows():
    """Dolly-like rows: a short question, a long context, a short answer."""
    context = " ".join(f"fact{i} is true." for i in range(60))
    return [{"instruction": f"What is fact {i}?", "input": context, "output": f"Fact {i} is true, says the text."}
            for i in range(4)] + [{"instruction": "Say hi.", "output": "Hi."}]


def test_long_context_keeps_its_answer_and_is_counted(tmp_path, chat_tok):
    rows = long_context_rows()
    full, _, _ = build(tmp_path, rows, chat_tok, max_seq_len=1024)
    train, _, report = build(tmp_path, rows, chat_tok, max_seq_len=64)
    assert len(train) == 5 and report.truncated == 4 and report.skipped == 0
    for ex, whole in zip(train, full):
        assert len(ex["input_ids"]) <= 64
        assert trained(ex["labels"]) == trained(whole["labels"])            # the whole answer
        assert ex["input_ids"][:4] == whole["input_ids"][:4]                 # the prompt's start
        answer_at = next(i for i, t in enumerate(whole["labels"]) if t != IGNORE)
        assert ex["input_ids"][-(len(whole["input_ids"]) - answer_at) - 2:] == whole["input_ids"][answer_at - 2:]
    line = report.line()
    assert line.startswith("data: 5 rows -> 5 train + 0 validation examples")
    assert "4 truncated to max_seq_len=64 (the prompt cut in the middle, the response kept)" in line
    assert line.endswith("0 dropped")


@pytest.mark.parametrize("objective, rows, how", [
    ("seq2seq", None, "source and target cut at their end"),
    ("cls", [{"text": " ".join(["word"] * 80), "label": i % 2} for i in range(4)], "cut at the end"),
    ("grpo", [{"prompt": " ".join(["word"] * 80), "final_answer": "1"} for _ in range(4)], "the prompt's start cut"),
])
def test_every_objective_counts_and_says_how_it_cut(tmp_path, objective, rows, how):
    from tunesmith.models.loader import ModelConfig, load_tokenizer
    tok = load_tokenizer(ModelConfig(name_or_path="random:t5" if objective == "seq2seq" else "random:llama"))
    long = " ".join(["word"] * 80)
    rows = rows or [{"instruction": long, "output": "short"}, {"instruction": "short", "output": long},
                    {"instruction": "short", "output": "short"}]
    train, _, report = build(tmp_path, rows, tok, max_seq_len=16, objective=objective)
    want = len(rows) - (objective == "seq2seq")   # the third seq2seq row fits
    assert report.truncated == want and report.skipped == 0, report.line()
    assert f"{want} truncated to max_seq_len=16 ({how}); 0 dropped" in report.line()
    for ex in train:
        assert all(len(v) <= 16 for k, v in ex.items() if k.endswith(("input_ids", "labels", "prompt_ids")))


def test_right_truncation_drops_answers_and_stops_over_the_limit(tmp_path, chat_tok):
    rows = long_context_rows()
    with pytest.raises(DataError, match=r"4 of 5 rows \(80%\) would be dropped: no trainable tokens left after "
                                        r"truncation to max_seq_len=64 with data.truncation: right, more than "
                                        r"data.max_drop_fraction=0.05 \(first: .*d.jsonl:1: .*\). Raise"):
        build(tmp_path, rows, chat_tok, max_seq_len=64, truncation="right")
    train, _, report = build(tmp_path, rows, chat_tok, max_seq_len=64, truncation="right", max_drop_fraction=0.9)
    assert len(train) == 1 and report.skipped == 4
    assert report.skipped_kinds == {"no trainable tokens left after truncation": 4}
    assert "4 dropped (4 no trainable tokens left after truncation), first: " in report.line()


def test_prepare_stops_over_the_drop_limit_and_leaves_no_manifest(tmp_path, chat_tok):
    from tunesmith.data.prepare import prepare
    from tunesmith.train import objectives
    sft = objectives.build_config("sft")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in long_context_rows()))
    cfg = DataConfig(train=str(path), val_split=0, truncation="right", cache=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"4 of 5 rows \(80%\) would be dropped: no trainable tokens left after "
                                        r"truncation to max_seq_len=64 with data.truncation: right, more than "
                                        r"data.max_drop_fraction=0.05 \(first: .*d.jsonl:1: .*\). Raise"):
        prepare(cfg, chat_tok, objective=sft, max_seq_len=64, progress=False)
    assert not list((tmp_path / "cache").rglob("manifest.json"))   # training from it refuses to start
    with pytest.raises(DataError, match=r"no prepared data for this config"):
        build_datasets(cfg, chat_tok, max_seq_len=64, objective=sft, seed=0)


# ---- empty fields -----------------------------------------------------------------------------------
@pytest.mark.parametrize("row, field", [
    ({"instruction": "Say hi.", "output": ""}, "output"),
    ({"instruction": "  ", "output": "Hi."}, "instruction"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1].content"),
])
def test_empty_fields_are_refused_or_skipped(tmp_path, bert_tok, row, field):
    rows = [{"instruction": "Say hi.", "output": "Hi."}, row] if "instruction" in row else \
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, row]
    with pytest.raises(DataError, match=rf"d\.jsonl:2: field '{re.escape(field)}' is empty"):
        build(tmp_path, rows, bert_tok)
    train, _, report = build(tmp_path, rows, bert_tok, on_error="skip")
    assert len(train) == 1 and report.skipped == 1 and report.skipped_kinds == {"invalid": 1}
    assert f"1 dropped (1 invalid), first: {tmp_path / 'd.jsonl'}:2: field '{field}' is empty" in report.line()


@pytest.mark.parametrize("fmt, row, field", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value"),
    ("text", {"text": "   "}, "text"),
    ("classification", {"text": "", "label": 1}, "text"),
    ("preference", {"prompt": "x", "chosen": "", "rejected": "y"}, "chosen"),
    ("preference", {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
    ("kto", {"prompt": "x", "completion": "", "label": True}, "completion"),
    ("prompt", {"prompt": ""}, "prompt"),
])
def test_empty_fields_of_every_format_are_refused(fmt, row, field):
    from tunesmith.data.formats import normalize
    from tunesmith.data.readers import Row
    with pytest.raises(DataError, match=rf"^f\.jsonl:3: field '{re.escape(field)}' is empty"):
        normalize(Row("f.jsonl:3", row), fmt)


def test_an_empty_optional_input_is_fine(tmp_path, bert_tok):
    train, _, report = build(tmp_path, [{"instruction": "Say hi.", "input": "", "output": "Hi."}], bert_tok)
    assert len(train) == 1 and report.skipped == 0


# ---- unreadable bytes and lines ------------------------------------------------------------------------
GOOD = b'{"instruction": "Say hi.", "output": "Hi."}\n'


def test_bad_utf8_in_jsonl_names_file_and_line(tmp_path, bert_tok):
    data = GOOD + b'{"instruction": "caf\xe9", "output": "x"}\n' + GOOD
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 21\)"):
        build(tmp_path, data, bert_tok)
    train, _, report = build(tmp_path, data, bert_tok, on_error="skip")
    assert len(train) == 2 and report.skipped_kinds == {"unreadable": 1}
    assert "d.jsonl:2: not valid UTF-8" in report.skipped_reasons[0]


def test_invalid_json_line_is_skipped_with_on_error_skip(tmp_path, bert_tok):
    data = GOOD + b'{"instruction": "x", \n' + b"[1, 2]\n" + GOOD
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        build(tmp_path, data, bert_tok)
    train, _, report = build(tmp_path, data, bert_tok, on_error="skip")
    assert len(train) == 2 and report.skipped_kinds == {"unreadable": 2}
    assert "d.jsonl:3: expected an object" in report.skipped_reasons[1]


@pytest.mark.parametrize("name, data, loc", [
    ("d.csv", b"instruction,output\nSay hi.,Hi.\ncaf\xff,x\n", "d.csv:3"),
    ("d.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xff", "output": "x"}]', "d.json: row 2"),
    ("d.txt", b"one document\n\ncaf\xff two\n", "d.txt:3"),
])
def test_bad_utf8_in_other_files(tmp_path, bert_tok, name, data, loc):
    (tmp_path / name).write_bytes(data)
    kw = {"txt_documents": "blank_line"} if name.endswith(".txt") else {}
    with pytest.raises(DataError, match=rf"{loc}: not valid UTF-8 \(byte 0x..."):
        read_rows(str(tmp_path / name), **kw)
    rows = read_rows(str(tmp_path / name), on_error="skip", **kw)
    assert [r.error is not None for r in rows] == [False, True]


# ---- plain-text corpora -----------------------------------------------------------------------------
def test_txt_file_is_one_document_or_one_per_blank_line_block(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n\nThird.\n")
    rows = read_rows(str(f))
    assert [r.data for r in rows] == [{"text": f.read_text().strip("\n")}] and rows[0].loc == f"{f}:1"
    rows = read_rows(str(f), txt_documents="blank_line")
    assert [r.data["text"] for r in rows] == ["First paragraph,\nstill the first.", "Second one.", "Third."]
    assert [r.loc for r in rows] == [f"{f}:1", f"{f}:5", f"{f}:7"]


def test_txt_directory_is_a_corpus_for_continued_pretraining(tmp_path, bert_tok):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("the second document " * 20)
    (corpus / "a.txt").write_text("the first document " * 20)
    (corpus / "sub" / "c.txt").write_text("the third document " * 20)
    (corpus / "notes.md").write_text("not read")
    rows = read_rows(str(corpus))
    assert [r.data["text"].split()[1] for r in rows] == ["first", "second", "third"]
    train, _, report = build_datasets(DataConfig(train=str(corpus), val_split=0), bert_tok, max_seq_len=32,
                                      objective="pt", seed=0)
    assert report.format == "text" and report.packed and report.rows_read == 3 and len(train) >= 3
    assert all(ex["labels"] == ex["input_ids"] for ex in train)
    with pytest.raises(DataError, match=r"corpus: plain text \(\.txt\) is read as format text .* not alpaca"):
        build_datasets(DataConfig(train=str(corpus), format="alpaca"), bert_tok, max_seq_len=32,
                       objective="sft", seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no \.txt files"):
        read_rows(str(tmp_path / "empty"))


def test_unpacked_text_documents_cut_at_the_end_are_counted(tmp_path, bert_tok):
    f = tmp_path / "c.txt"
    f.write_text("a short one\n\n" + "a much longer document " * 20 + "\n")
    train, _, report = build_datasets(DataConfig(train=str(f), val_split=0, packing=False, txt_documents="blank_line"),
                                      bert_tok, max_seq_len=16, objective="pt", seed=0)
    assert len(train) == 2 and report.truncated == 1 and "1 truncated to max_seq_len=16 (cut at the end)" in report.line()


# ---- end to end: the run stops before writing anything ----------------------------------------------
@pytest.mark.parametrize("content, message", [
    (GOOD * 8 + b'{"instruction": "caf\xe9", "output": "x"}\n', r"d\.jsonl:9: not valid UTF-8"),
    (GOOD * 8 + b'{"instruction": "Say hi.", "output": ""}\n', r"d\.jsonl:9: field 'output' is empty"),
    (b'{"instruction": "' + b"word " * 80 + b'", "output": "Hi."}\n' + GOOD * 8,
     r"1 of 9 rows \(11%\) would be dropped: no trainable tokens left after truncation to max_seq_len=32"),
])
def test_bad_data_stops_the_run_before_anything_is_written(tmp_path, content, message):
    import tunesmith
    from helpers import run_config
    (tmp_path / "d.jsonl").write_bytes(content)
    cfg = run_config(tmp_path / "d.jsonl", tmp_path, {"name": "lora", "r": 2}, max_steps=1, max_seq_len=32)
    cfg["data"].update(truncation="right", val_split=0)
    with pytest.raises(DataError, match=message):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()
