"""Predictors that score rows with forward passes: language-modelling loss and preference rewards."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.chat import IGNORE, ChatRenderer
from ..data.collate import collate, pad_id_for
from ..data.tokenize import tokenize_lm, tokenize_pref
from ..errors import ConfigError


def _device(model) -> torch.device:
    return next(model.parameters()).device


def row_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of next-token cross-entropy, scored tokens); logits (B, T, V), labels (B, T)."""
    shift = labels[:, 1:]                                                  # (B, T-1)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift, ignore_index=IGNORE,
                         reduction="none")                                 # (B, T-1)
    return ce.sum(-1), (shift != IGNORE).sum(-1)


def _batches(examples: list[dict], size: int, pad_id: int, device, desc: str, progress: bool):
    bar = tqdm(total=len(examples), desc=desc, unit="row", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        batch = collate(chunk, pad_id)
        yield i, {k: v.to(device) for k, v in batch.items()}
        bar.update(len(chunk))
    bar.close()


def _lm_model(model):
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ConfigError(f"--task lm needs a language model; {type(model).__name__} has no language-model head")
    return model


@torch.no_grad()
def predict_lm(inp) -> list[dict]:
    """One record per row: its summed token loss and token count (responses only, all tokens for text)."""
    model = _lm_model(inp.model).eval()
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError("--task lm scores decoder-only models; this is an encoder-decoder")
    objective = "pt" if inp.fmt == "text" else "sft"
    out = tokenize_lm(inp.rows, inp.fmt, inp.tokenizer, ChatRenderer(inp.tokenizer, inp.system_prompt),
                      max_seq_len=inp.max_seq_len, objective=objective, packing=False)
    kept = _kept_locs(inp.rows, out.dropped)
    records = []
    for start, batch in _batches(out.examples, inp.batch_size, pad_id_for(inp.tokenizer), _device(model), "lm",
                                 inp.progress):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        sums, counts = row_token_losses(logits, batch["labels"])
        for j, (s, n) in enumerate(zip(sums.tolist(), counts.tolist())):
            records.append({"loc": kept[start + j], "loss_sum": s, "tokens": int(n), "loss": s / max(n, 1)})
    return records


def _kept_locs(rows, dropped: list[str]) -> list[str]:
    """Locations of the rows the tokenizer kept (dropped messages start with the row's location)."""
    gone = {d.split(": ", 1)[0] for d in dropped}
    return [loc for loc, _ in rows if loc not in gone]


# ---- preference ----------------------------------------------------------------------------------
def _reward_fn(model):
    """Reward of (ids, mask, labels): a one-label classifier's score, else the summed log-probability of the
    response under the model minus that under its base (a tuned model with its adapter disabled: DPO's
    implicit reward with beta 1), or the plain log-probability for a model without a method."""
    from ..methods.inject import disable_adapters, tuned_layers
    if "SequenceClassification" in type(model).__name__:
        if model.config.num_labels != 1:
            raise ConfigError(f"--task preference: a classifier with {model.config.num_labels} labels is not a reward "
                              "model (expected one output: an rm run)")
        return lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    _lm_model(model)

    def logp(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        sums, _ = row_token_losses(logits, labels)
        return -sums
    if not any(True for _ in tuned_layers(model)):
        return logp

    def implicit(ids, mask, labels):
        policy = logp(ids, mask, labels)
        with disable_adapters(model):
            return policy - logp(ids, mask, labels)
    return implicit


@torch.no_grad()
def predict_preference(inp) -> list[dict]:
    """One record per pair: the reward of the chosen and of the rejected response."""
    model = inp.model.eval()
    reward = _reward_fn(model)
    out = tokenize_pref(inp.rows, inp.tokenizer, ChatRenderer(inp.tokenizer), max_seq_len=inp.max_seq_len)
    kept = _kept_locs(inp.rows, out.dropped)
    sides = {s: [{"input_ids": ex[f"{s}_input_ids"], "labels": ex[f"{s}_labels"]} for ex in out.examples]
             for s in ("chosen", "rejected")}
    rewards = {}
    for side, examples in sides.items():
        vals = []
        for _, batch in _batches(examples, inp.batch_size, pad_id_for(inp.tokenizer), _device(model), side,
                                 inp.progress):
            vals += reward(batch["input_ids"], batch["attention_mask"], batch["labels"]).tolist()
        rewards[side] = vals
    return [{"loc": loc, "chosen_reward": c, "rejected_reward": r}
            for loc, c, r in zip(kept, rewards["chosen"], rewards["rejected"])]
