"""Tokenization: exact label masks for the template and fallback paths, truncation, packing."""

from __future__ import annotations

import pytest

from tunesmith.data import DataConfig, DataError, build_datasets
from tunesmith.data.chat import ChatRenderer

IGNORE = -100
ALPACA = {"instruction": "Say hi to Bob.", "input": "", "output": "Hello there, Bob."}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(labels):
    return [t for t in labels if t != IGNORE]


def build(write, tok, rows, objective="sft", max_seq_len=256, **cfg):
    cfg.setdefault("val_split", 0)
    path = write("d.jsonl", rows)
    return build_datasets(DataConfig(train=path, **cfg), tok, max_seq_len=max_seq_len,
                          objective=objective, seed=0)


def expected_chatml(tok, msgs):
    """Labels built segment by segment: only assistant content + <|im_end|> is trained."""
    ids, labels = [], []
    for m in msgs:
        head = enc(tok, f"<|im_start|>{m['role']}\n")
        body = enc(tok, m["content"] + "<|im_end|>")
        tail = enc(tok, "\n")
        ids += head + body + tail
        labels += [IGNORE] * len(head) + (body if m["role"] == "assistant" else [IGNORE] * len(body))
        labels += [IGNORE] * len(tail)
    return ids, labels


def test_alpaca_fallback_masks_everything_but_answer_and_eos(write, bert_tok):
    train, _, _ = build(write, bert_tok, [ALPACA])
    ex = train[0]
    answer = enc(bert_tok, ALPACA["output"]) + [bert_tok.sep_token_id]  # BERT: eos falls back to [SEP]
    prompt = enc(bert_tok, "### Instruction:\nSay hi to Bob.\n\n### Response:\n")
    assert ex["input_ids"] == prompt + answer
    assert ex["labels"] == [IGNORE] * len(prompt) + answer
    assert bert_tok.decode(trained(ex["labels"])) == "hello there, bob. [SEP]"


def test_alpaca_fallback_with_input_and_system_prompt(write, bert_tok):
    row = dict(ALPACA, input="Bob is a cat.")
    train, _, _ = build(write, bert_tok, [row], system_prompt="You are kind.")
    prompt = enc(bert_tok, "You are kind.\n\n### Instruction:\nSay hi to Bob.\n\n### Input:\nBob is a cat."
                           "\n\n### Response:\n")
    assert train[0]["input_ids"][: len(prompt)] == prompt
    assert trained(train[0]["labels"]) == enc(bert_tok, ALPACA["output"]) + [bert_tok.sep_token_id]


def test_alpaca_with_chat_template(write, chat_tok):
    train, _, _ = build(write, chat_tok, [ALPACA])
    msgs = [{"role": "user", "content": ALPACA["instruction"]}, {"role": "assistant", "content": ALPACA["output"]}]
    ids, labels = expected_chatml(chat_tok, msgs)
    assert train[0]["input_ids"] == ids and train[0]["labels"] == labels
    assert chat_tok.decode(trained(labels)) == "hello there, bob. <|im_end|>"


@pytest.mark.parametrize("key", ["messages", "sharegpt"])
def test_multi_turn_template_trains_every_assistant_turn(write, chat_tok, key):
    if key == "messages":
        row = {"messages": CHAT}
    else:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        row = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]}
    train, _, _ = build(write, chat_tok, [row])
    ids, labels = expected_chatml(chat_tok, CHAT)
    assert train[0]["input_ids"] == ids and train[0]["labels"] == labels
    assert trained(labels) == enc(chat_tok, "Four.<|im_end|>") + enc(chat_tok, "Six, of course.<|im_end|>")


def test_multi_turn_fallback(write, bert_tok):
    train, _, _ = build(write, bert_tok, [{"messages": CHAT}])
    sep = bert_tok.sep_token_id
    ids, labels = [], []
    for m in CHAT:
        head, body = enc(bert_tok, f"{m['role']}: "), enc(bert_tok, m["content"])
        if m["role"] == "assistant":
            body = body + [sep]
        ids += head + body
        labels += [IGNORE] * len(head) + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    assert train[0]["input_ids"] == ids and train[0]["labels"] == labels
    assert bert_tok.decode(trained(labels)) == "four. [SEP] six, of course. [SEP]"


def test_system_prompt_with_template(write, chat_tok):
    train, _, _ = build(write, chat_tok, [{"messages": CHAT[1:3]}], system_prompt="Be brief.")
    assert train[0]["input_ids"] == expected_chatml(chat_tok, CHAT[:3])[0]


def test_system_prompt_merged_when_template_has_no_system_role(chat_tok):
    tok = chat_tok.__class__.from_pretrained(chat_tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}"
                         "[{{ m['role'] }}] {{ m['content'] }} [END]\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    ids, labels = ChatRenderer(tok, "Be brief.").messages(CHAT[1:3])
    assert ids == enc(tok, "[user] Be brief.\n\nWhat is two plus two? [END]\n[assistant] Four. [END]\n")
    assert trained(labels) == enc(tok, "Four. [END]")


def test_template_that_is_not_prefix_stable_falls_back_to_search(chat_tok):
    tok = chat_tok.__class__.from_pretrained(chat_tok.name_or_path)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = chat_tok.chat_template + "count {{ messages|length }}"  # footer changes per prefix
    ids, labels = ChatRenderer(tok).messages(CHAT)
    assert ids == expected_chatml(tok, CHAT)[0] + enc(tok, f"count {len(CHAT)}")
    assert trained(labels) == enc(tok, "Four.<|im_end|>") + enc(tok, "Six, of course.<|im_end|>")


def test_slow_tokenizer_path_matches_offsets_path(chat_tok):
    class NoOffsets:
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, *args, **kw):
            if kw.get("return_offsets_mapping"):
                raise NotImplementedError
            return self._tok(*args, **kw)

    fast = ChatRenderer(chat_tok).messages(CHAT)
    slow = ChatRenderer(NoOffsets(chat_tok)).messages(CHAT)
    assert slow == fast == expected_chatml(chat_tok, CHAT)


def test_right_truncation_keeps_the_beginning(write, bert_tok):
    full, _, _ = build(write, bert_tok, [ALPACA])
    cut, _, report = build(write, bert_tok, [ALPACA], max_seq_len=len(full[0]["input_ids"]) - 2, truncation="right")
    n = len(cut[0]["input_ids"])
    assert n == len(full[0]["input_ids"]) - 2
    assert cut[0]["input_ids"] == full[0]["input_ids"][:n]
    assert cut[0]["labels"] == full[0]["labels"][:n]
    assert report.truncated == 1


def test_default_truncation_keeps_the_answer(write, bert_tok):
    full, _, _ = build(write, bert_tok, [ALPACA])
    n = len(full[0]["input_ids"]) - 2
    cut, _, report = build(write, bert_tok, [ALPACA], max_seq_len=n)
    answer = trained(full[0]["labels"])
    assert len(cut[0]["input_ids"]) == n and trained(cut[0]["labels"]) == answer
    assert cut[0]["input_ids"][-len(answer):] == answer and report.truncated == 1 and report.skipped == 0


def test_fully_masked_examples_are_dropped_and_counted(write, bert_tok):
    long_prompt = dict(ALPACA, instruction="word " * 40)
    rows = [ALPACA, long_prompt, ALPACA]
    train, _, report = build(write, bert_tok, rows, max_seq_len=30, truncation="right", on_error="skip")
    assert len(train) == 2 and report.skipped == 1
    assert report.skipped_reasons[0].endswith(":2: no trainable tokens left after truncation to max_seq_len=30")
    with pytest.raises(DataError, match=r"d\.jsonl: no examples left after filtering"):
        build(write, bert_tok, [long_prompt], max_seq_len=30, truncation="right", on_error="skip")


def test_pt_on_alpaca_trains_every_token(write, bert_tok):
    train, _, _ = build(write, bert_tok, [ALPACA], objective="pt")
    assert train[0]["labels"] == train[0]["input_ids"]


def test_text_without_packing_is_one_example_per_document(write, bert_tok):
    docs = ["the cat sat on the mat", "a b c d e f g h i j k l m n o p"]
    train, _, _ = build(write, bert_tok, [{"text": d} for d in docs], objective="pt", packing=False,
                        max_seq_len=8)
    sep = bert_tok.sep_token_id
    assert [ex["input_ids"] for ex in train] == [enc(bert_tok, docs[0]) + [sep], enc(bert_tok, docs[1])[:8]]
    assert all(ex["labels"] == ex["input_ids"] for ex in train)


def test_packing_cuts_blocks_and_preserves_every_token(write, bert_tok):
    docs = [" ".join(f"w{i}x{j}" for j in range(i + 3)) for i in range(7)]
    train, _, report = build(write, bert_tok, [{"text": d} for d in docs], objective="pt", max_seq_len=16)
    stream = [t for d in docs for t in enc(bert_tok, d) + [bert_tok.sep_token_id]]
    blocks = [ex["input_ids"] for ex in train]
    assert [t for b in blocks for t in b] == stream
    assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert len(blocks) == -(-len(stream) // 16)
    assert all(ex["labels"] == ex["input_ids"] for ex in train)
    assert report.train_tokens == len(stream)


def test_classification_examples(write, bert_tok):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
            {"sentence": "fine", "label": "neutral"}]
    train, _, report = build(write, bert_tok, rows, objective="cls")
    assert report.label_names == ["neg", "neutral", "pos"] and report.num_labels == 3
    assert [ex["label"] for ex in train] == [2, 0, 1]
    assert train[0]["input_ids"] == bert_tok("good")["input_ids"]  # [CLS] good [SEP]


def test_classification_pairs_and_truncation(write, bert_tok):
    rows = [{"text": "one two three four five", "text_pair": "six seven", "label": 0},
            {"text": "a", "text_pair": "b", "label": 1}]
    train, _, _ = build(write, bert_tok, rows, objective="cls", max_seq_len=6)
    assert len(train[0]["input_ids"]) == 6
    assert train[1]["input_ids"] == bert_tok("a", "b")["input_ids"]


def test_preference_strings_mask_the_prompt(write, bert_tok):
    row = {"prompt": "Human: hi\n\nAssistant:", "chosen": " Hello friend.", "rejected": " Go away."}
    train, _, report = build(write, bert_tok, [row], objective="dpo")
    ex, sep = train[0], bert_tok.sep_token_id
    prompt = enc(bert_tok, row["prompt"])
    for side in ("chosen", "rejected"):
        answer = enc(bert_tok, row[side]) + [sep]
        assert ex[f"{side}_input_ids"] == prompt + answer
        assert ex[f"{side}_labels"] == [IGNORE] * len(prompt) + answer
    assert report.train_tokens == len(ex["chosen_input_ids"]) + len(ex["rejected_input_ids"])


def test_preference_message_lists_train_only_the_last_answer(write, chat_tok):
    convo = CHAT[:4]
    row = {"chosen": convo + [{"role": "assistant", "content": "Six."}],
           "rejected": convo + [{"role": "assistant", "content": "Seven."}]}
    train, _, _ = build(write, chat_tok, [row], objective="rm")
    ex = train[0]
    assert trained(ex["chosen_labels"]) == enc(chat_tok, "Six.<|im_end|>")
    assert trained(ex["rejected_labels"]) == enc(chat_tok, "Seven.<|im_end|>")
    assert ex["chosen_input_ids"] == expected_chatml(chat_tok, row["chosen"])[0]


def test_preference_prompt_prepended_to_assistant_only_lists(write, chat_tok):
    row = {"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    train, _, _ = build(write, chat_tok, [row], objective="dpo")
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert (train[0]["chosen_input_ids"], train[0]["chosen_labels"]) == expected_chatml(chat_tok, msgs)
