"""Scores from a reward model trained with ``objective: rm``: the scalar head's reward of a completion.

The text is tokenized as in training (``data.tokenize``: a string prompt and completion as
``bos + prompt + completion + eos``; message lists through the chat template), so a score here is the
reward the model was trained to give.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.chat import ChatRenderer
from ..data.collate import collate, pad_id_for
from ..data.tokenize import _pref_side
from ..errors import ConfigError

_LOADED: dict = {}


def _reward_model(run):
    from .. import api
    if isinstance(run, tuple):
        return run
    key = str(Path(run).resolve())
    if key not in _LOADED:
        model, tokenizer = api.load(run)
        if getattr(model.config, "num_labels", None) != 1 or "SequenceClassification" not in type(model).__name__:
            raise ConfigError(f"score: {run} is not a reward model (train one with objective: {{name: rm}})")
        model.config.pad_token_id = pad_id_for(tokenizer)
        _LOADED.clear()
        _LOADED[key] = (model.eval(), tokenizer)
    return _LOADED[key]


@torch.no_grad()
def score(run, prompt, completion=None, *, batch_size: int = 8) -> float | list[float]:
    """The reward of ``completion`` given ``prompt`` (strings or message lists) under the reward model of
    ``run`` (a run directory, or a loaded ``(model, tokenizer)``); lists of prompts and completions give a
    list of scores."""
    model, tokenizer = _reward_model(run)
    single = not isinstance(completion, list) or (completion and isinstance(completion[0], dict))
    prompts, completions = ([prompt], [completion]) if single else (prompt, completion)
    if len(prompts) != len(completions):
        raise ConfigError(f"score: {len(prompts)} prompts for {len(completions)} completions")
    renderer = ChatRenderer(tokenizer)
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [{"input_ids": _pref_side(p, c, tokenizer, renderer)[0]}
                for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        batch = collate(rows, pad_id_for(tokenizer))
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        out += logits[:, 0].float().tolist()
    return out[0] if single else out
