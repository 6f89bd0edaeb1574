"""Sequence-to-sequence examples: each row as a source the encoder reads and a target the decoder writes.

The instruction formats map onto (source, target):

* ``alpaca``: source = instruction (a blank line and the input after it, when there is one), target = output;
* ``messages`` / ``sharegpt``: target = the last assistant turn; source = the turns before it — a lone user
  turn (after an optional system message, or ``data.system_prompt``) as its plain text, a longer history
  as ``role: text`` lines.

A summarization set maps onto alpaca with ``data.field_map``, e.g. ``{dialogue: instruction, summary: output}``.
Nothing is masked: the encoder reads the whole source, and every target token is a label.

Example keys: ``input_ids`` (the source, with the tokenizer's own special tokens: T5's ``</s>``, BART's
``<s> … </s>``) and ``decoder_labels`` (the target, tokenized as a target, ``text_target=``). The
``decoder_`` prefix gives the target its own padded length in a batch (collate pads it with -100).
"""
from __future__ import annotations

from .tokenize import BATCH, Tokenized

FORMATS = ("alpaca", "messages", "sharegpt")
LABELS = "decoder_labels"


def source_target(row: dict, fmt: str, system_prompt: str | None = None) -> tuple[str, str]:
    """The (source, target) texts of a canonical row of ``fmt``."""
    if fmt == "alpaca":
        source = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return _with_system(source, system_prompt), row["output"]
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    history = msgs[:last]
    system = [m["content"] for m in history if m["role"] == "system"]
    turns = [m for m in history if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        source = turns[0]["content"]
    else:
        source = "\n".join(f"{m['role']}: {m['content']}" for m in turns)
    return _with_system(source, system[0] if system else system_prompt), msgs[last]["content"]


def _with_system(source: str, system: str | None) -> str:
    return f"{system}\n\n{source}" if system else source


def tokenize_seq2seq(rows, fmt: str, tokenizer, *, max_seq_len: int, system_prompt: str | None = None) -> Tokenized:
    """Examples from ``(loc, canonical row)`` pairs; source and target are each cut to ``max_seq_len`` (by the
    tokenizer, which keeps its special tokens), and the rows cut are counted."""
    out = Tokenized()
    for i in range(0, len(rows), BATCH):
        chunk = rows[i:i + BATCH]
        pairs = [source_target(r, fmt, system_prompt) for _, r in chunk]
        src = _cut(tokenizer, [s for s, _ in pairs], max_seq_len, "text")
        tgt = _cut(tokenizer, [t for _, t in pairs], max_seq_len, "text_target")
        out.truncated += sum(a or b for (_, a), (_, b) in zip(src, tgt))
        for (loc, _), (s, _), (t, _) in zip(chunk, src, tgt):
            if not t:
                out.dropped.append(f"{loc}: the target tokenizes to nothing")
                continue
            out.examples.append({"input_ids": list(s), LABELS: list(t)})
    return out


def _cut(tokenizer, texts: list[str], max_seq_len: int, kind: str) -> list[tuple[list[int], bool]]:
    """``(ids, whether they were cut)`` of each text; only the texts that are too long are tokenized twice."""
    ids = [list(x) for x in tokenizer(**{kind: texts}, verbose=False)["input_ids"]]
    long = [j for j, x in enumerate(ids) if len(x) > max_seq_len]
    if long:
        cut = tokenizer(**{kind: [texts[j] for j in long]}, truncation=True, max_length=max_seq_len)["input_ids"]
        for j, x in zip(long, cut):
            ids[j] = list(x)
    was_cut = set(long)
    return [(x, j in was_cut) for j, x in enumerate(ids)]
