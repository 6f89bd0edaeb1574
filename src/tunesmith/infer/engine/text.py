"""Text around the engine: prompts rendered as at training time, stop tokens, streamed text.

:class:`Prompter` turns a conversation into the ids a model answers from, with the renderer that
tokenized its training data (:class:`tunesmith.data.chat.ChatRenderer`): the tokenizer's chat
template where it has one (with the run's ``data.system_prompt`` added the same way), else the
plain layouts tunesmith trains on — the alpaca layout for one user turn, ``role: content`` lines
for longer conversations (or always, for runs trained on ``messages``/``sharegpt`` data).

:func:`stop_token_ids` finds the tokens that end an answer: EOS, the model's
``generation_config.eos_token_id`` and the special tokens the training renderer puts after an
assistant turn (``<|im_end|>``, ``<|eot_id|>`` …), so training and serving stop at the same marker.

:class:`TextStream` turns a growing list of ids into text deltas, holding back what could still
become a stop string or an incomplete UTF-8 character.
"""
from __future__ import annotations

from pathlib import Path

from ...data.chat import IGNORE, ChatRenderer, bos_ids, encode

Messages = list[dict[str, str]]
LAYOUTS = ("auto", "template", "alpaca", "messages")


class Prompter:
    """Prompt ids for chat messages and raw completions, as the model was trained."""

    def __init__(self, tokenizer, system_prompt: str | None = None, layout: str = "auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        self.tok = tokenizer
        if tokenizer is None:    # token ids in, token ids out
            self.layout = "ids"
            return
        self.system_prompt = system_prompt
        self.renderer = ChatRenderer(tokenizer, system_prompt)
        has_template = self.renderer.has_template
        self.layout = ("template" if has_template else "alpaca") if layout == "auto" else layout

    def completion(self, prompt: str | list[int]) -> list[int]:
        """Raw text (the tokenizer's special tokens added, as ``tokenizer(prompt)``) or ids as given."""
        if isinstance(prompt, list):
            return [int(i) for i in prompt]
        if self.tok is None:
            raise ValueError("this model has no tokenizer: give the prompt as token ids")
        return list(self.tok(prompt)["input_ids"])

    def chat(self, messages: Messages) -> list[int]:
        """Ids of ``messages`` followed by the start of the assistant's answer."""
        if self.tok is None:
            raise ValueError("this model has no tokenizer: give the prompt as token ids")
        if not messages or messages[-1]["role"] == "assistant":
            raise ValueError("messages must end with a user (or system/tool) turn for the assistant to answer")
        if self.layout == "template":
            msgs = self.renderer._with_system([dict(m) for m in messages])
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return encode(self.tok, text)
        users = [m for m in messages if m["role"] == "user"]
        others = [m for m in messages if m["role"] not in ("user", "system")]
        if self.layout == "alpaca" and len(users) == 1 and not others:
            return self._alpaca(messages, users[0]["content"])
        ids, labels = self.renderer.messages([*messages, {"role": "assistant", "content": ""}], last_only=True)
        return ids[:labels.index(next(x for x in labels if x != IGNORE))]

    def _alpaca(self, messages: Messages, instruction: str) -> list[int]:
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        renderer = self.renderer if system is None else ChatRenderer(self.tok, system)
        ids, labels = renderer.alpaca({"instruction": instruction, "input": "", "output": ""})
        return [i for i, lab in zip(ids, labels) if lab == IGNORE]


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """EOS, the model's generation-config EOS ids and the special tokens that end a trained answer."""
    out: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        out.update(value if isinstance(value, (list, tuple, set)) else [] if value is None else [value])
    if tokenizer is None:
        return {int(i) for i in out}
    if not out and getattr(tokenizer, "sep_token_id", None) is not None:
        out.add(tokenizer.sep_token_id)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            specials.add(int(tid))
    renderer = ChatRenderer(tokenizer)
    try:
        ids, labels = renderer.messages([{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello there"}])
    except Exception:  # a template that refuses this probe: EOS alone
        return {int(i) for i in out}
    bos = set(bos_ids(tokenizer))
    out.update(i for i, lab in zip(ids, labels) if lab != IGNORE and i in specials and i not in bos)
    return {int(i) for i in out}


class TextStream:
    """Incremental detokenization with stop strings.

    ``push(ids)`` takes every output id so far (the last call's ids and more) and returns
    ``(new_text, stopped)``; text that could be the start of a stop string or an unfinished
    character is held back until it is settled. Each push decodes only the new ids, after the ids
    of the last push as context (what a tokenizer needs to place a leading space or finish a
    multi-byte character), so a long completion costs the same per token at its end as at its start.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, tuple(stop)
        self.sent = 0
        self.text = ""           # the text settled so far (cut before a stop string once one is found)
        self.ids: list[int] = []
        self.context = self.read = 0   # ids[:read] are in text; ids[context:read] lead the next decode
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _settle(self, final: bool = False) -> None:
        """Add to ``text`` what ids[read:] decode to after their context; an unfinished character
        (a trailing U+FFFD) waits for the next ids unless ``final``."""
        ids = self.ids
        if self.read >= len(ids):
            return
        before, after = self._decode(ids[self.context:self.read]), self._decode(ids[self.context:])
        if not after.startswith(before):      # the context decodes differently now: take the whole text
            before, after = self.text, self._decode(ids)
            if not after.startswith(before):
                before = after[:len(before)]
        if after.endswith("\ufffd") and not final:
            return
        self.text += after[len(before):]
        self.context, self.read = self.read, len(ids)

    def push(self, ids: list[int]) -> tuple[str, bool]:
        self.ids = ids
        self._settle()
        text = self.text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self._take(len(self.text)), True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return self._take(max(self.sent, len(text) - hold)), False

    def finish(self) -> str:
        """The completion's whole text (an unfinished character at the end included, as U+FFFD)."""
        if not self.stopped:
            self._settle(final=True)
        return self.text

    def flush(self) -> str:
        """Everything not sent yet (at the end of a completion)."""
        return self._take(len(self.finish()))

    def _take(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def run_defaults(path) -> dict:
    """``{"system_prompt", "layout"}`` a run directory (or its adapter/ inside) was trained with."""
    import yaml
    p = Path(path)
    for cand in (p / "config.yaml", p.parent / "config.yaml"):
        if cand.is_file():
            data = (yaml.safe_load(cand.read_text()) or {}).get("data") or {}
            fmt = data.get("format")
            return {"system_prompt": data.get("system_prompt"),
                    "layout": "messages" if fmt in ("messages", "sharegpt") else "auto"}
    return {"system_prompt": None, "layout": "auto"}
