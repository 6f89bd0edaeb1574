"""Encoder-decoders in the engine: greedy tokens equal transformers' ``generate`` for T5 and BART under
every kind of method (LoRA, virtual tokens on encoder and decoder, adapters, IA3, selective), rows
finishing at different steps; per-row LoRA adapters on one T5 base equal each adapter alone."""
from __future__ import annotations

import copy

import pytest
import torch

import tunesmith
from helpers import ids, tiny
from tunesmith.infer.engine import Engine, Request, SamplingParams
from tunesmith.methods import registry

LENGTHS = [6, 2, 4, 5]


def _perturb(model, seed=0, scale=0.05, trainable_only=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _generate(model, prompt, n):
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None)
    return out[0, 1:].tolist()   # after the decoder start token


def _prompts(vocab):
    rows = ids(4, 9, vocab=vocab, seed=3).tolist()
    return [[max(3, t) for t in row[:n]] for row, n in zip(rows, (9, 4, 7, 2))]


def _engine_tokens(engine, prompts, models=None):
    hs = [engine.submit(Request(prompt=p, model=m, params=SamplingParams(max_tokens=n, ignore_eos=True)))
          for p, n, m in zip(prompts, LENGTHS, models or [None] * len(prompts))]
    engine.run_until_done()
    return [h.result().token_ids for h in hs]


@pytest.mark.parametrize("family,method", [("t5", None), ("bart", None), ("t5", "lora"), ("bart", "lora"),
                                           ("t5", "prompt"), ("t5", "prefix"), ("t5", "ptuning_v2"),
                                           ("t5", "ia3"), ("t5", "adapter"), ("t5", "bitfit")])
def test_greedy_equals_generate_with_rows_finishing_apart(family, method):
    model = tiny(family, task="seq2seq", seed=1)
    if method:
        model = tunesmith.apply(model, method)
    _perturb(model)
    model.eval()
    prompts = _prompts(model.config.vocab_size)
    got = _engine_tokens(Engine(model, None, max_batch=3, fast=False), prompts)   # the fourth row waits
    assert got == [_generate(model, p, n) for p, n in zip(prompts, LENGTHS)]
    assert [len(g) for g in got] == LENGTHS


def test_per_row_lora_adapters_on_one_t5_base(tmp_path):
    base = tiny("t5", task="seq2seq", seed=1).eval()
    alone, dirs = {"base": copy.deepcopy(base)}, {}
    for i, name in enumerate(("a", "b")):
        model = tunesmith.apply(copy.deepcopy(base), "lora", r=2 + 2 * i)
        _perturb(model, seed=i + 1, scale=0.2, trainable_only=True)   # the base stays shared
        dirs[name] = registry.attached(model).save(model, tmp_path / name, "random:t5")
        alone[name] = model.eval()
    engine = Engine(base, None, fast=False, max_batch=4)
    assert engine.add_adapter("a", dirs["a"]) == "per-row" and engine.add_adapter("b", dirs["b"]) == "per-row"
    prompts, names = _prompts(base.config.vocab_size), ["a", "base", "b", "a"]
    got = _engine_tokens(engine, prompts, [None if n == "base" else n for n in names])
    assert got == [_generate(alone[n], p, k) for p, n, k in zip(prompts, names, LENGTHS)]
    assert len({tuple(g) for g in got[:3]}) == 3   # the adapters do change the tokens
