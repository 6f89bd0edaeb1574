"""The prompts of online RL, tokenized as the generation engine renders them.

Each example is ``{"prompt_ids": [...], "prompt": str, "fields": {...}, "loc": "FILE:LINE"}``: the prompt
through the chat template with the assistant's turn opened (or the plain layout without a template, as
``tunesmith chat`` does), its text (the last user turn for message lists: what reward functions see), and
the row's other fields for the reward functions. A prompt longer than ``max_seq_len`` tokens keeps its last
``max_seq_len`` (counted as truncated).
"""
from __future__ import annotations

from .tokenize import Tokenized


def tokenize_prompts(rows, tokenizer, cfg, *, max_seq_len: int) -> Tokenized:
    from ..infer.engine.text import Prompter
    prompter = Prompter(tokenizer, cfg.system_prompt)
    out = Tokenized()
    for loc, row in rows:
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = prompter.chat(messages)
        if len(ids) > max_seq_len:
            ids = ids[-max_seq_len:]
            out.truncated += 1
        text = prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt)
                                                           if m["role"] == "user")
        out.examples.append({"prompt_ids": ids, "prompt": text, "fields": row["fields"], "loc": loc})
    return out
