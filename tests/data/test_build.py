"""build_datasets end to end: validation split, validation files, labels, max_rows, report."""

from __future__ import annotations

import pytest

from tunesmith.data import DataConfig, DataError, build_datasets

DOCS = [{"text": f"document number {i}"} for i in range(40)]


def doc_ids(tok, ds):
    """Which DOCS rows a text dataset (packing off) holds, from the decoded tokens."""
    return sorted(int(tok.decode(ex["input_ids"]).split()[2]) for ex in ds)


def build(tok, objective="pt", seed=0, **cfg):
    if objective == "pt":
        cfg.setdefault("packing", False)
    return build_datasets(DataConfig(**cfg), tok, max_seq_len=64, objective=objective, seed=seed)


def test_val_split_is_deterministic_disjoint_and_complete(write, bert_tok):
    path = write("d.jsonl", DOCS)
    tr1, va1, rep = build(bert_tok, train=path, val_split=0.2)
    tr2, va2, _ = build(bert_tok, train=path, val_split=0.2)
    _, va3, _ = build(bert_tok, train=path, val_split=0.2, seed=1)
    assert doc_ids(bert_tok, va1) == doc_ids(bert_tok, va2)
    assert doc_ids(bert_tok, tr1) == doc_ids(bert_tok, tr2)
    assert doc_ids(bert_tok, va1) != doc_ids(bert_tok, va3)
    assert not set(doc_ids(bert_tok, tr1)) & set(doc_ids(bert_tok, va1))
    assert sorted(doc_ids(bert_tok, tr1) + doc_ids(bert_tok, va1)) == list(range(40))
    assert (rep.train_rows, rep.validation_rows) == (32, 8)


def test_val_split_takes_at_least_one_row_and_zero_disables(write, bert_tok):
    path = write("d.jsonl", DOCS[:5])
    _, va, rep = build(bert_tok, train=path, val_split=0.01)
    assert len(va) == 1 and rep.train_rows == 4
    _, va, rep = build(bert_tok, train=path, val_split=0)
    assert va is None and rep.validation_rows == 0 and rep.train_rows == 5
    with pytest.raises(DataError, match=r"one\.jsonl: val_split=0\.5 of 1 rows leaves no training rows"):
        build(bert_tok, train=write("one.jsonl", DOCS[:1]), val_split=0.5)


def test_validation_file_and_max_rows(write, bert_tok):
    train = write("t.jsonl", DOCS)
    val = write("v.jsonl", DOCS[:3])
    tr, va, rep = build(bert_tok, train=train, validation=val, max_rows=10)
    assert doc_ids(bert_tok, tr) == list(range(10)) and doc_ids(bert_tok, va) == [0, 1, 2]
    assert rep.train_tokens == sum(len(ex["input_ids"]) for ex in tr)


def test_missing_validation_file(write, bert_tok):
    with pytest.raises(DataError, match=r"validation file not found: 'nope\.jsonl'"):
        build(bert_tok, train=write("t.jsonl", DOCS), validation="nope.jsonl")


def test_int_labels_used_as_is(write, bert_tok):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 2}]
    tr, _, rep = build(bert_tok, "cls", train=write("c.jsonl", rows), val_split=0)
    assert [ex["label"] for ex in tr] == [1, 0, 2]
    assert rep.num_labels == 3 and rep.label_names == ["0", "1", "2"]


def test_int_labels_with_a_gap_are_an_error(write, bert_tok):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    with pytest.raises(DataError, match=r"gap\.jsonl: integer labels must cover 0\.\.2 but \[1\] never occur"):
        build(bert_tok, "cls", train=write("gap.jsonl", rows), val_split=0)


def test_label_names_fix_the_order(write, bert_tok):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": 1}]
    tr, _, rep = build(bert_tok, "cls", train=write("c.jsonl", rows), val_split=0, label_names=["pos", "neg"])
    assert [ex["label"] for ex in tr] == [0, 1, 1] and rep.label_names == ["pos", "neg"]
    bad = rows + [{"text": "d", "label": "meh"}]
    with pytest.raises(DataError, match=r"c2\.jsonl:4: field 'label' has value 'meh', which is not in "
                                        r"data\.label_names; known labels: \['pos', 'neg'\]"):
        build(bert_tok, "cls", train=write("c2.jsonl", bad), val_split=0, label_names=["pos", "neg"])


def test_unseen_validation_label(write, bert_tok):
    train = write("t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    val = write("v.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}])
    with pytest.raises(DataError, match=r"v\.jsonl:2: field 'label' has value 'meh', which is not among "
                                        r"the train labels; known labels: \['neg', 'pos'\]"):
        build(bert_tok, "cls", train=train, validation=val)
    _, va, rep = build(bert_tok, "cls", train=train, validation=val, on_error="skip")
    assert len(va) == 1 and rep.skipped == 1 and "v.jsonl:2" in rep.skipped_reasons[0]


def test_mixed_label_kinds(write, bert_tok):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": 0}]
    with pytest.raises(DataError, match=r"mix\.jsonl:2: field 'label' mixes int and str"):
        build(bert_tok, "cls", train=write("mix.jsonl", rows), val_split=0)


def test_csv_string_digit_labels_become_ints(write, bert_tok):
    rows = [{"text": f"t{i}", "label": str(i % 3)} for i in range(6)]
    tr, _, rep = build(bert_tok, "cls", train=write("c.csv", rows), val_split=0)
    assert [ex["label"] for ex in tr] == [0, 1, 2, 0, 1, 2] and rep.num_labels == 3


def test_label_vocabulary_comes_from_the_whole_train_file(write, bert_tok):
    rows = [{"text": f"t{i}", "label": "common"} for i in range(19)] + [{"text": "x", "label": "rare"}]
    for seed in range(4):  # whichever split holds the rare row, both labels are known
        tr, va, rep = build(bert_tok, "cls", seed=seed, train=write("c.jsonl", rows), val_split=0.25)
        assert rep.label_names == ["common", "rare"] and len(tr) + len(va) == 20
