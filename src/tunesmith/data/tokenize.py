"""Normalised rows -> token examples for each objective, with truncation and packing.

Too-long rows are cut by :mod:`tunesmith.data.truncate` (``data.truncation``) and counted.

Example shapes:

- sft / pt: ``{"input_ids": [...], "labels": [...]}`` (labels -100 where masked)
- cls: ``{"input_ids": [...], "label": int}``
- rm / dpo: ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .chat import IGNORE, ChatRenderer, bos_ids, encode, eos_id
from .truncate import fit

BATCH = 1000  # rows per tokenizer call for plain texts


@dataclass
class Tokenized:
    """Examples built from a list of rows plus the rows dropped on the way."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_seq_len (kept)


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), BATCH):
        out += [list(x) for x in tokenizer(texts[i : i + BATCH], add_special_tokens=False, verbose=False)["input_ids"]]
    return out


NO_LABELS = "no trainable tokens left after truncation"


def _no_labels(loc: str, max_seq_len: int) -> str:
    return f"{loc}: {NO_LABELS} to max_seq_len={max_seq_len}"


def tokenize_lm(rows, fmt: str, tokenizer, renderer: ChatRenderer, *, max_seq_len: int,
                objective: str, packing: bool, truncation: str = "middle", response_share: float = 0.75
                ) -> Tokenized:
    """sft/pt examples. ``rows`` are ``(loc, canonical dict)`` pairs."""
    if fmt == "text":
        return _text(rows, tokenizer, max_seq_len=max_seq_len, packing=packing)
    out = Tokenized()
    for loc, row in rows:
        if fmt == "alpaca":
            ids, labels = renderer.alpaca(row)
        else:
            ids, labels = renderer.messages(row["messages"])
        if objective == "pt":
            labels = list(ids)
        ids, labels, cut = fit(ids, labels, max_seq_len, truncation, response_share)
        if all(x == IGNORE for x in labels):
            out.dropped.append(_no_labels(loc, max_seq_len))
            continue
        out.truncated += cut
        out.examples.append({"input_ids": ids, "labels": labels})
    return out


def _text(rows, tokenizer, *, max_seq_len: int, packing: bool) -> Tokenized:
    """One document per row: ``bos? + text + eos``; packed into max_seq_len blocks if asked."""
    return text_blocks(text_docs(rows, tokenizer), max_seq_len=max_seq_len, packing=packing)


def text_docs(rows, tokenizer) -> list[list[int]]:
    """``bos? + text + eos`` token ids of each ``(loc, {"text"})`` row."""
    bos, eos = bos_ids(tokenizer), eos_id(tokenizer)
    return [bos + ids + [eos] for ids in _encode_many(tokenizer, [r["text"] for _, r in rows])]


def text_blocks(docs, *, max_seq_len: int, packing: bool) -> Tokenized:
    """Documents laid end to end and cut into max_seq_len blocks (packing), or each cut to max_seq_len."""
    out = Tokenized()
    if packing:
        stream = [t for doc in docs for t in doc]
        for i in range(0, len(stream), max_seq_len):
            block = stream[i : i + max_seq_len]
            out.examples.append({"input_ids": block, "labels": list(block)})
        return out
    for doc in docs:
        out.truncated += len(doc) > max_seq_len
        doc = doc[:max_seq_len]
        out.examples.append({"input_ids": doc, "labels": list(doc)})
    return out


def tokenize_cls(rows, tokenizer, label_ids: dict, *, max_seq_len: int) -> Tokenized:
    """cls examples: the tokenizer's own special tokens, ``text_pair`` as second segment."""
    out = Tokenized()
    for i in range(0, len(rows), BATCH):
        chunk = [r for _, r in rows[i : i + BATCH]]
        texts = [r["text"] for r in chunk]
        pairs = [r["text_pair"] for r in chunk]
        if any(p is None for p in pairs) and not all(p is None for p in pairs):
            raise DataError(f"{rows[i][0]}: field 'text_pair' is set on some rows but not others; "
                            "give it on every row or on none")
        second = None if pairs[0] is None else pairs
        encoded = [list(x) for x in tokenizer(texts, second, verbose=False)["input_ids"]]
        long = [j for j, x in enumerate(encoded) if len(x) > max_seq_len]
        if long:  # the tokenizer's own truncation (it keeps the special tokens), for the rows that need it
            cut = tokenizer([texts[j] for j in long], None if second is None else [second[j] for j in long],
                            truncation=True, max_length=max_seq_len)["input_ids"]
            for j, ids in zip(long, cut):
                encoded[j] = list(ids)
        out.truncated += len(long)
        for ids, r in zip(encoded, chunk):
            out.examples.append({"input_ids": ids, "label": label_ids[r["label"]]})
    return out


def tokenize_pref(rows, tokenizer, renderer: ChatRenderer, *, max_seq_len: int, truncation: str = "middle",
                  response_share: float = 0.75) -> Tokenized:
    """rm/dpo examples; the prompt is masked, the response is trained.

    Str rows are concatenated as ``bos? + prompt + response + eos`` (no template, like the
    classic HH format). Message-list rows go through the chat renderer with only the last
    assistant turn trained; ``prompt`` is prepended when the lists hold only assistant turns.
    """
    out = Tokenized()
    for loc, row in rows:
        ex: dict[str, Any] = {}
        cut = False
        for side in ("chosen", "rejected"):
            ids, labels = _pref_side(row["prompt"], row[side], tokenizer, renderer)
            ids, labels, side_cut = fit(ids, labels, max_seq_len, truncation, response_share)
            ex[f"{side}_input_ids"], ex[f"{side}_labels"], cut = ids, labels, cut or side_cut
        if any(all(x == IGNORE for x in ex[f"{s}_labels"]) for s in ("chosen", "rejected")):
            out.dropped.append(_no_labels(loc, max_seq_len))
            continue
        out.truncated += cut
        if "margin" in row:
            ex["margin"] = row["margin"]
        out.examples.append(ex)
    return out


def _pref_side(prompt, response, tokenizer, renderer: ChatRenderer) -> tuple[list[int], list[int]]:
    if isinstance(response, str):
        head = renderer.bos + encode(tokenizer, prompt)
        body = encode(tokenizer, response) + [eos_id(tokenizer)]
        return head + body, [IGNORE] * len(head) + body
    msgs = list(response)
    if prompt is not None and all(m["role"] == "assistant" for m in msgs):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        msgs = turns + msgs
    return renderer.messages(msgs, last_only=True)


# -- the tokenized shapes an objective can ask for (its config's ``tokenized``) ----------------------------

def _lm_shape(objective: str):
    def shape(rows, fmt, tokenizer, cfg, *, mapping, max_seq_len, packing) -> Tokenized:
        renderer = ChatRenderer(tokenizer, cfg.system_prompt)
        return tokenize_lm(rows, fmt, tokenizer, renderer, max_seq_len=max_seq_len, objective=objective,
                           packing=packing, truncation=cfg.truncation, response_share=cfg.max_response_share)
    return shape


def _cls_shape(rows, fmt, tokenizer, cfg, *, mapping, max_seq_len, packing) -> Tokenized:
    return tokenize_cls(rows, tokenizer, mapping, max_seq_len=max_seq_len)


def _seq2seq_shape(rows, fmt, tokenizer, cfg, *, mapping, max_seq_len, packing) -> Tokenized:
    from .seq2seq import tokenize_seq2seq
    return tokenize_seq2seq(rows, fmt, tokenizer, max_seq_len=max_seq_len, system_prompt=cfg.system_prompt)


def _pair_shape(rows, fmt, tokenizer, cfg, *, mapping, max_seq_len, packing) -> Tokenized:
    return tokenize_pref(rows, tokenizer, ChatRenderer(tokenizer), max_seq_len=max_seq_len,
                         truncation=cfg.truncation, response_share=cfg.max_response_share)


def tokenize_unpaired(rows, tokenizer, renderer: ChatRenderer, *, max_seq_len: int, truncation: str = "middle",
                      response_share: float = 0.75) -> Tokenized:
    """kto examples: ``input_ids``/``labels`` of prompt + completion, ``label`` (1 desirable, 0 not), and
    ``kl_input_ids``/``kl_labels``: the prompt with the previous row's completion, the mismatched pair whose
    log-ratio estimates the KL term (TRL's rotation by one, over the file's order)."""
    out = Tokenized()
    for i, (loc, row) in enumerate(rows):
        other = rows[i - 1][1]["completion"]
        ex: dict[str, Any] = {}
        cut = False
        for key, completion in (("", row["completion"]), ("kl_", other)):
            ids, labels = _pref_side(row["prompt"], completion, tokenizer, renderer)
            ids, labels, c = fit(ids, labels, max_seq_len, truncation, response_share)
            ex[f"{key}input_ids"], ex[f"{key}labels"], cut = ids, labels, cut or c
        if all(x == IGNORE for x in ex["labels"]) or all(x == IGNORE for x in ex["kl_labels"]):
            out.dropped.append(_no_labels(loc, max_seq_len))
            continue
        ex["label"] = int(row["label"])
        out.truncated += cut
        out.examples.append(ex)
    return out


def _unpaired_shape(rows, fmt, tokenizer, cfg, *, mapping, max_seq_len, packing) -> Tokenized:
    return tokenize_unpaired(rows, tokenizer, ChatRenderer(tokenizer), max_seq_len=max_seq_len,
                             truncation=cfg.truncation, response_share=cfg.max_response_share)


#: tokenized shape -> tokenizer of ``(loc, canonical row)`` pairs. sft/pt: ``input_ids``, ``labels``;
#: cls: ``input_ids``, ``label``; seq2seq: source ids and ``decoder_labels``; pair: ``chosen_*`` and
#: ``rejected_*`` ids and labels (the prompt masked).
SHAPES = {"sft": _lm_shape("sft"), "pt": _lm_shape("pt"), "cls": _cls_shape, "seq2seq": _seq2seq_shape,
          "pair": _pair_shape, "unpaired": _unpaired_shape}
