"""Rollouts: G completions of each prompt sampled from the policy's own weights, in this process, and scored.

The generation engine (``infer.engine``) decodes on the very model being trained (eval mode, no gradients,
the method's wrappers on, LoRA's A and B copied once per rollout into the compute dtype): no second copy
of the weights, nothing to synchronise. Every completion has a seed of its own drawn from (run seed, step,
index), so a rollout does not depend on the batch it was decoded in or on the global RNG, and a resumed
run samples what the uninterrupted one did.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from ..objectives._preference import inference
from . import rewards as rewards_mod


@dataclass
class Rollout:
    """N = prompts × G completions (the G of a prompt adjacent) with their rewards."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    prompts: list[str]
    completions: list[str]
    fields: list[dict]
    locs: list[str]
    truncated: list[bool]
    values: dict[str, list[float]]         # each reward function's values
    total: torch.Tensor                    # (N,) the weighted sum
    gen_s: float = 0.0
    reward_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def generated(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class Sampler:
    """The engine over the training model (made once) and the sampling parameters of an objective config."""

    def __init__(self, model, tokenizer, cfg, max_prompt: int, seed: int, max_batch: int = 64):
        from ...infer.engine import Engine
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=1 << 16,
                             max_len=self.max_len(model, cfg, max_prompt))
        self.model, self.cfg, self.seed = model, cfg, seed

    @staticmethod
    def slots(tc, cfg) -> int:
        """Rows the engine decodes together: one rollout batch (all its prompts' completions), at most 256."""
        return min(256, tc.batch_size * tc.grad_accum * cfg.num_generations)

    @staticmethod
    def max_len(model, cfg, max_prompt: int) -> int:
        """The engine's tokens a row: prompt plus completion, within the model's context."""
        cap = getattr(model.config, "max_position_embeddings", None) or (max_prompt + cfg.max_tokens)
        return min(cap, max_prompt + cfg.max_tokens)

    def params(self, temperature: float, seed: int):
        from ...infer.engine import SamplingParams
        c = self.cfg
        return SamplingParams(max_tokens=c.max_tokens, temperature=temperature, top_p=c.top_p, top_k=c.top_k,
                              seed=seed)

    def sample(self, examples: list[dict], g: int, step: int, temperature: float) -> list:
        """Completions of every example, ``g`` each (adjacent), from the current weights."""
        from ...infer.engine import Request
        from ...methods.inject import frozen_adapters
        with inference(self.model, disable=False), frozen_adapters(self.model), _engine_log_off():
            # a failed row is raised by rollout()
            handles = []
            for i, ex in enumerate(examples):
                for j in range(g):
                    seed = (self.seed * 1_000_003 + step * 65_537 + i * 97 + j) % (1 << 62)
                    req = Request(prompt=list(ex["prompt_ids"]), params=self.params(temperature, seed))
                    handles.append(self.engine.submit(req, sink=lambda out: None))
            self.engine.run_until_done()
            return [h.result() for h in handles]


@contextlib.contextmanager
def _engine_log_off():
    logger = logging.getLogger("tunesmith.infer.engine.core")
    was, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was


def rollout(sampler: Sampler, reward_fns, examples: list[dict], g: int, step: int, temperature: float) -> Rollout:
    t0 = time.perf_counter()
    outs = sampler.sample(examples, g, step, temperature)
    gen_s = time.perf_counter() - t0
    bad = next((o for o in outs if o.finish_reason == "error"), None)
    if bad is not None:
        if "nan" in bad.error.lower() and "inf" in bad.error.lower():   # the sampler's check (engine/sampling.py)
            raise FloatingPointError(f"the policy's next-token probabilities became NaN or infinite (sampling the "
                                     f"rollout failed: {bad.error})")
        raise RuntimeError(f"rollout: generation failed: {bad.error}")
    rep = [ex for ex in examples for _ in range(g)]
    texts = [o.text for o in outs]
    t1 = time.perf_counter()
    prompts, fields, locs = [ex["prompt"] for ex in rep], [ex["fields"] for ex in rep], [ex["loc"] for ex in rep]
    values = rewards_mod.score(reward_fns, prompts, texts, fields, locs)
    total = torch.tensor(rewards_mod.total(reward_fns, values), dtype=torch.float32)
    return Rollout(prompt_ids=[list(ex["prompt_ids"]) for ex in rep], completion_ids=[list(o.token_ids) for o in outs],
                   prompts=prompts, completions=texts, fields=fields, locs=locs,
                   truncated=[o.finish_reason == "length" for o in outs], values=values, total=total,
                   gen_s=gen_s, reward_s=time.perf_counter() - t1)
