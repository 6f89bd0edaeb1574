"""Text generation from a model, a run directory or an adapter, optionally proxy-tuned.

``generate(model, prompts)`` tokenizes the prompts (left-padded), renders them as a user turn
when asked (``chat``: the tokenizer's chat template, else the same plain "### Instruction:"
layout tunesmith trains on) and decodes with transformers' ``model.generate``; virtual-token
methods add their tokens inside the model. An encoder-decoder reads each prompt as its source text
(right-padded, as it trains: :mod:`tunesmith.data.seq2seq`) and the answer is what its decoder writes. With ``expert`` and ``anti_expert`` it decodes with
proxy-tuning instead (see :mod:`tunesmith.infer.proxy`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .proxy import ProxyTuned, Sampler

ModelLike = nn.Module | str | Path


def resolve(model: ModelLike, tokenizer=None, *, device: str = "auto", dtype: str = "auto"):
    """``(model, tokenizer)`` from a loaded model or anything ``tunesmith.load`` accepts."""
    if isinstance(model, nn.Module):
        return model, tokenizer
    from ..api import load
    loaded, tok = load(model, device=device, dtype=dtype)
    return loaded, tokenizer if tokenizer is not None else tok


def prompt_ids(tokenizer, prompt: str, chat: bool | None) -> list[int]:
    """Token ids of one prompt: raw text, or a user turn ready for the assistant's answer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is False or (chat is None and not has_template):
        return list(tokenizer(prompt)["input_ids"])
    if has_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    from ..data.chat import IGNORE, ChatRenderer
    ids, labels = ChatRenderer(tokenizer).alpaca({"instruction": prompt, "input": "", "output": ""})
    return [i for i, lab in zip(ids, labels) if lab == IGNORE]


def left_pad(rows: list[list[int]], pad_id: int, right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left (``right``: on the right)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if right else slice(width - len(r), width)
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def generate(model: ModelLike, prompts: str | list[str], *, tokenizer=None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             chat: bool | None = None, expert: ModelLike | None = None, anti_expert: ModelLike | None = None,
             alpha: float = 1.0, device: str = "auto") -> str | list[str]:
    """Complete ``prompts`` (one string or a list) and return the new text (same shape).

    ``model``, ``expert`` and ``anti_expert`` are loaded models or paths/names for
    ``tunesmith.load`` (run directories, adapters, model directories, embedded names). Give both
    ``expert`` and ``anti_expert`` for proxy-tuning: logits = model + alpha · (expert − anti_expert).
    ``chat``: render each prompt as a user turn (None: when the tokenizer has a chat template).
    """
    if (expert is None) != (anti_expert is None):
        raise ConfigError("generate: proxy-tuning needs both expert and anti_expert (or neither)")
    if max_new_tokens < 1:
        raise ConfigError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    model, tokenizer = resolve(model, tokenizer, device=device)
    if tokenizer is None:
        raise ConfigError("generate: pass tokenizer= with a loaded model")
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq and expert is not None:
        raise ConfigError("generate: proxy-tuning combines decoder-only models token by token; "
                          f"{type(model).__name__} is an encoder-decoder")
    rows = [list(tokenizer(t)["input_ids"]) if seq2seq and not chat else prompt_ids(tokenizer, t, chat) for t in texts]
    ids, mask = left_pad(rows, pad_id or 0, right=seq2seq)
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    model.eval()
    with torch.no_grad():
        if expert is not None:
            proxy = ProxyTuned(model, resolve(expert, device=device)[0], resolve(anti_expert, device=device)[0], alpha)
            out = proxy.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                 pad_token_id=pad_id or 0, sampler=Sampler(do_sample, temperature, top_p, gen))
        else:
            if seed is not None:
                torch.manual_seed(seed)
            sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
    # a decoder-only model's output repeats the prompt; an encoder-decoder's starts with the decoder start token
    new = tokenizer.batch_decode(out[:, 1:] if seq2seq else out[:, ids.shape[1]:], skip_special_tokens=True)
    return new[0] if single else new
