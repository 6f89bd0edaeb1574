"""Turn conversations into token ids with assistant-only labels.

With a chat template (``tokenizer.chat_template``) the conversation is rendered once with
``apply_chat_template``; each assistant turn's character span is found by rendering the
prefix before it (with the generation prompt) and the prefix through it, and tokens whose
characters lie mostly inside a span are trained. The span runs to the end of the turn
(trailing newlines excluded), so the template's end-of-turn marker is trained too.

Without a template a plain fallback is used, and ``eos`` is appended to every answer:

- alpaca: ``"[system\\n\\n]### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n"``
  (masked), then ``"{output}" + eos`` (trained);
- messages: one ``"{role}: {content}\\n"`` line per turn; for assistant turns ``content + eos``
  is trained, the ``"assistant: "`` prefix and the newline are masked.
"""

from __future__ import annotations

from typing import Any

from .errors import DataError

IGNORE = -100
Messages = list[dict[str, str]]


def eos_id(tokenizer) -> int:
    """The end-of-sequence id (``eos_token_id``, else ``sep_token_id``); DataError if none."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataError("tokenizer has neither eos_token nor sep_token; set tokenizer.eos_token")


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer itself adds BOS to a single text, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


class ChatRenderer:
    """Renders alpaca rows and message lists to ``(input_ids, labels)``."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.bos = bos_ids(tokenizer)
        self._system_ok: bool | None = None
        self._specials: list[str] | None = None

    # ---- public -------------------------------------------------------------------------
    def alpaca(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """Ids and labels for an alpaca row; only the output (and its end marker) is trained."""
        if self.has_template:
            user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            return self.messages(msgs)
        prompt = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        prompt += f"### Instruction:\n{row['instruction']}\n\n"
        if row["input"]:
            prompt += f"### Input:\n{row['input']}\n\n"
        prompt += "### Response:\n"
        answer = encode(self.tok, row["output"]) + [eos_id(self.tok)]
        ids = self.bos + encode(self.tok, prompt)
        return ids + answer, [IGNORE] * len(ids) + answer

    def messages(self, msgs: Messages, *, last_only: bool = False) -> tuple[list[int], list[int]]:
        """Ids and labels for a conversation; assistant turns trained (only the last if ``last_only``)."""
        msgs = self._with_system(msgs)
        if self.has_template:
            return self._templated(msgs, last_only)
        return self._plain(msgs, last_only)

    # ---- system prompt ------------------------------------------------------------------
    def _with_system(self, msgs: Messages) -> Messages:
        if not self.system_prompt or any(m["role"] == "system" for m in msgs):
            return msgs
        if not self.has_template or self._template_takes_system():
            return [{"role": "system", "content": self.system_prompt}, *msgs]
        out = [dict(m) for m in msgs]
        for m in out:
            if m["role"] == "user":
                m["content"] = f"{self.system_prompt}\n\n{m['content']}"
                break
        return out

    def _template_takes_system(self) -> bool:
        if self._system_ok is None:
            probe = [{"role": "system", "content": "SYSPROBE"}, {"role": "user", "content": "hi"}]
            try:
                self._system_ok = "SYSPROBE" in self._render(probe, False)
            except Exception:  # templates raise their own errors for unsupported roles
                self._system_ok = False
        return self._system_ok

    # ---- fallback -----------------------------------------------------------------------
    def _plain(self, msgs: Messages, last_only: bool) -> tuple[list[int], list[int]]:
        ids, labels = list(self.bos), [IGNORE] * len(self.bos)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        for i, m in enumerate(msgs):
            head = encode(self.tok, f"{m['role']}: ")
            ids += head
            labels += [IGNORE] * len(head)
            if m["role"] == "assistant":
                body = encode(self.tok, m["content"]) + [eos_id(self.tok)]
                train = not last_only or i == last
                labels += body if train else [IGNORE] * len(body)
            else:
                body = encode(self.tok, m["content"])
                labels += [IGNORE] * len(body)
            ids += body
            nl = encode(self.tok, "\n")
            ids += nl
            labels += [IGNORE] * len(nl)
        return ids, labels

    # ---- chat template ------------------------------------------------------------------
    def _render(self, msgs: Messages, gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _spans(self, msgs: Messages, last_only: bool) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and the character spans of the trained assistant turns."""
        full = self._render(msgs, False)
        spans, cursor = [], 0
        idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for i in idx[-1:] if last_only else idx:
            span = self._prefix_span(msgs, i, full, cursor) or self._search_span(msgs[i], full, cursor)
            start, end = span
            while end > start and full[end - 1] in " \n":  # leave trailing newlines masked
                end -= 1
            spans.append((start, end))
            cursor = span[1]
        return full, spans

    def _prefix_span(self, msgs: Messages, i: int, full: str, cursor: int):
        try:
            before = self._render(msgs[:i], True) if i else ""
            through = self._render(msgs[: i + 1], False)
        except Exception:  # some templates refuse partial conversations
            return None
        if cursor <= len(before) < len(through) and full.startswith(through) and through.startswith(before):
            return len(before), len(through)
        return None

    def _search_span(self, msg: dict[str, str], full: str, cursor: int) -> tuple[int, int]:
        """Template is not prefix-stable: find the content and any special token right after it."""
        start = full.find(msg["content"], cursor)
        if start < 0:
            raise DataError("chat template output does not contain an assistant message verbatim; "
                            "cannot locate the answer to train on")
        end = start + len(msg["content"])
        tail = full[end:]
        for special in self._special_strings():
            if special and tail.lstrip(" \n").startswith(special):
                end += len(tail) - len(tail.lstrip(" \n")) + len(special)
                break
        return start, end

    def _special_strings(self) -> list[str]:
        """Special token strings (longest first): named specials and added tokens marked special."""
        if self._specials is not None:
            return self._specials
        found = set(getattr(self.tok, "all_special_tokens", []) or [])
        for added in (getattr(self.tok, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                found.add(str(added))
        self._specials = sorted(found, key=len, reverse=True)
        return self._specials

    def _templated(self, msgs: Messages, last_only: bool) -> tuple[list[int], list[int]]:
        full, spans = self._spans(msgs, last_only)
        try:
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: count prefixes
            ids = encode(self.tok, full)
            labels = [IGNORE] * len(ids)
            for s, e in spans:
                a, b = len(encode(self.tok, full[:s])), len(encode(self.tok, full[:e]))
                labels[a:b] = ids[a:b]
            return ids, labels
        labels, k = [IGNORE] * len(ids), 0
        for j, (start, end) in enumerate(offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k < len(spans) and _inside(start, end, spans[k]):
                labels[j] = ids[j]
        return ids, labels


def _inside(start: int, end: int, span: tuple[int, int]) -> bool:
    """Token [start, end) belongs to span: more than half its characters lie inside it."""
    if end <= start:
        return span[0] <= start < span[1]
    overlap = min(end, span[1]) - max(start, span[0])
    return 2 * overlap > end - start
