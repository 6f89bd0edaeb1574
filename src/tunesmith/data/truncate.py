"""Fitting a tokenized row into ``max_seq_len``: keep the response, cut the prompt.

A row is ``prompt + response``: the response starts at the last run of trained labels (the final
assistant turn, with whatever the template puts after it) and the prompt is everything before.
When the row is too long (``data.truncation``):

* ``middle`` (default): the response is kept and the prompt loses its middle, so its start (system
  prompt, instruction) and its end (the text just before the answer, the assistant header) stay;
* ``left``: the response is kept and the prompt loses its start;
* ``right``: the row's end is cut, as a plain ``ids[:max_seq_len]`` (the response may be lost).

If the response alone would take more than ``response_share`` of ``max_seq_len`` while the prompt
needs room too, it keeps that share (cut at its end) and the prompt gets the rest; a short prompt
leaves all the remaining room to the response. Rows trained everywhere (continued pre-training)
have no prompt, so they are cut at the end.
"""
from __future__ import annotations

from .chat import IGNORE

POLICIES = ("middle", "left", "right")


def response_start(labels: list[int]) -> int:
    """Index where the last run of trained labels begins (``len(labels)`` when nothing is trained)."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i if any(x != IGNORE for x in labels[i:]) else len(labels)


def fit(ids: list[int], labels: list[int], max_len: int, policy: str = "middle",
        response_share: float = 0.75) -> tuple[list[int], list[int], bool]:
    """``(ids, labels, truncated)`` with at most ``max_len`` tokens, cut by ``policy``."""
    n = len(ids)
    if n <= max_len:
        return ids, labels, False
    if policy == "right":
        return ids[:max_len], labels[:max_len], True
    split = response_start(labels)
    if split == n:  # nothing trained: nothing to keep
        return ids[:max_len], labels[:max_len], True
    keep_resp = min(n - split, max(max_len - split, int(response_share * max_len), 1))
    keep_prompt = max_len - keep_resp
    if policy == "left":
        head, tail = 0, keep_prompt
    else:
        head = (keep_prompt + 1) // 2
        tail = keep_prompt - head
    prompt = list(range(head)) + list(range(split - tail, split))
    idx = prompt + list(range(split, split + keep_resp))
    return [ids[i] for i in idx], [labels[i] for i in idx], True
