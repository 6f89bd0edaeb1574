"""The online step and what grpo, rloo and ppo share.

One loop step (``OnlineStep``) is::

    prompts  = the next train.grad_accum batches of train.batch_size prompts (resumable, as offline batches)
    rollout  = G completions of each, sampled from the policy's own weights; each reward function's values
    no-grad  = the sampling policy's log-probs (μ > 1 or ppo), the reference's (β > 0 or ppo), values (ppo)
    advantages from the rewards (the objective's ``advantages``)
    μ times:  for each micro-batch of completions: (objective.micro_loss / the batch's normaliser).backward()
              optimizer_step (the learning-rate schedule moves once per loop step)

and logs, besides loss / lr / grad_norm: ``reward`` and ``reward_std`` (the weighted total), ``reward/<name>``
and ``reward/<name>_std`` per function, ``kl`` (to the reference, when there is a reference pass),
``entropy``, ``clip_fraction``, ``completion_length``, ``truncated`` (the fraction cut at max_tokens),
``advantage_std``, ``generation_s`` / ``update_s`` and ``generated_tokens_per_s``.

Evaluation (``loss`` on a batch of prompts) samples one completion per prompt at ``eval_temperature`` and
returns minus the summed reward as its loss, with every reward's sum; the first ``samples`` validation
prompts of each evaluation go to ``samples.jsonl`` with their completions and rewards.
"""
from __future__ import annotations

import copy
import json
import time

import torch

from ..loop import autocast
from ..objectives import Objective
from ..objectives._preference import inference, reference_kind
from ..step import optimizer_step
from . import logps as logps_mod
from . import rewards as rewards_mod
from .rollout import Sampler, rollout


class OnlineObjective(Objective):
    """Base of the online RL objectives: subclasses give ``advantages`` and ``micro_loss``."""

    needs_reference = False   # ppo: its reward always carries the KL penalty
    needs_old = False         # ppo: the sampling policy's log-probs and values before the updates

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.reward_fns = rewards_mod.build(self.cfg.rewards)
        self.sampler = self.tokenizer = self.run = self.reference = None
        self.step_no = 0
        self.val_locs: set = set()
        self.written: dict[int, int] = {}

    # -- what the loop and the runner call -------------------------------------------------------
    def count(self, batch):
        return len(batch["examples"])

    def prepare(self, model, method, datasets, *, run) -> None:
        self.run = run
        if len(datasets) > 1 and datasets[1] is not None:
            self.val_locs = {ex["loc"] for ex in datasets[1].examples}
        if self.wants_reference():
            self.reference = copy.deepcopy(model) if reference_kind(model) == "copy" else None
            if self.reference is not None:
                for p in self.reference.parameters():
                    p.requires_grad_(False)

    def wants_reference(self) -> bool:
        return bool(self.cfg.beta) or self.needs_reference

    def train_step(self, *, batches, tokenizer, run):
        self.tokenizer, self.run = tokenizer, run
        return OnlineStep(self)

    def _sampler(self, model) -> Sampler:
        if self.sampler is None:
            t = self.run.train
            self.sampler = Sampler(model, self.tokenizer, self.cfg, t.max_seq_len, t.seed,
                                   max_batch=Sampler.slots(t, self.cfg))
        return self.sampler

    def loss(self, model, batch):
        examples = batch["examples"]
        roll = rollout(self._sampler(model), self.reward_fns, examples, 1, -1 - self.step_no, self.cfg.eval_temperature)
        extra = {"reward": roll.total.sum(), **{f"reward/{k}": torch.tensor(v).sum() for k, v in roll.values.items()},
                 "completion_length": torch.tensor(float(sum(len(c) for c in roll.completion_ids))),
                 "truncated": torch.tensor(float(sum(roll.truncated)))}
        self._write_samples(roll)
        return -roll.total.sum(), len(examples), extra

    def _write_samples(self, roll) -> None:
        if not self.cfg.samples or self.run is None:
            return
        val = [i for i, loc in enumerate(roll.locs) if loc in self.val_locs] if self.val_locs else range(len(roll.locs))
        done = self.written.get(self.step_no, 0)
        take = list(val)[:max(0, self.cfg.samples - done)]
        if not take:
            return
        self.written[self.step_no] = done + len(take)
        with open(self.run.run_dir / "samples.jsonl", "a") as f:
            for i in take:
                f.write(json.dumps({"step": self.step_no, "loc": roll.locs[i], "prompt": roll.prompts[i],
                                    "completion": roll.completions[i], "reward": float(roll.total[i]),
                                    **{f"reward/{k}": v[i] for k, v in roll.values.items()},
                                    "truncated": roll.truncated[i]}) + "\n")

    # -- the reference policy -------------------------------------------------------------------------
    def reference_logps(self, model, chunk) -> torch.Tensor:
        target = self.reference if self.reference is not None else model
        with inference(target, disable=self.reference is None):
            return logps_mod.token_logps(target, chunk, self.cfg.temperature)[0]

    # -- what each objective defines -----------------------------------------------------------------
    def advantages(self, roll, chunks: list[dict]) -> None:
        """Set each chunk's ``advantages`` (and what its loss needs) from the rollout."""
        raise NotImplementedError

    def normaliser(self, chunks: list[dict]) -> float:
        raise NotImplementedError

    def micro_loss(self, model, chunk: dict) -> tuple[torch.Tensor, dict]:
        """The chunk's loss sum (divided by :meth:`normaliser`) and its stat sums (token-weighted)."""
        raise NotImplementedError

    def value_head(self, model):
        return None

    def step_state(self) -> dict:
        return {}

    def load_step_state(self, state: dict) -> None:
        pass

    def after_rollout(self, chunks: list[dict]) -> dict:
        """Log entries of the rollout beyond the common ones (ppo: the KL coefficient)."""
        return {}


class OnlineStep:
    """The loop step of the online objectives (see the module docstring)."""

    def __init__(self, objective: OnlineObjective):
        self.objective = objective
        self.on_optimizer = None   # (model, optimizer, scheduler) -> None, once before any step (ppo's value head)

    def bind(self, model, optimizer, scheduler) -> None:
        """Called by the runner once the optimizer exists, before a resume restores it."""
        if self.on_optimizer is not None:
            self.on_optimizer(model, optimizer, scheduler)

    def state_dict(self) -> dict:
        return self.objective.step_state()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_step_state(state)

    def _chunks(self, loop, roll) -> list[dict]:
        obj, cfg = self.objective, self.objective.cfg
        n = len(roll.completion_ids)
        size = cfg.micro_batch or max(1, n // loop.cfg.grad_accum)
        chunks = []
        for i in range(0, n, size):
            chunk = logps_mod.rows(roll.prompt_ids[i:i + size], roll.completion_ids[i:i + size],
                                   loop.batches.pad_id, loop.device)
            chunk["index"] = slice(i, i + size)
            chunks.append(chunk)
        head = obj.value_head(loop.model)
        if cfg.updates > 1 or obj.needs_old or obj.wants_reference() or getattr(cfg, "reference_kl", False):
            for chunk in chunks:
                with autocast(loop.device, loop.precision):
                    if cfg.updates > 1 or obj.needs_old:
                        with inference(loop.model, disable=False):
                            old, _, values = logps_mod.token_logps(loop.model, chunk, cfg.temperature, head)
                        chunk["old_logp"], chunk["old_values"] = old, values
                    if obj.wants_reference() or getattr(cfg, "reference_kl", False):
                        chunk["ref_logp"] = obj.reference_logps(loop.model, chunk)
        return chunks

    def __call__(self, loop, state) -> dict:
        obj, cfg, model = self.objective, self.objective.cfg, loop.model
        obj.step_no = state.step
        examples = [ex for k in range(loop.cfg.grad_accum) for ex in loop.batches.get(state.micro + k)["examples"]]
        roll = rollout(obj._sampler(model), obj.reward_fns, examples, cfg.num_generations, state.step, cfg.temperature)
        t0 = time.perf_counter()
        model.train()
        chunks = self._chunks(loop, roll)
        obj.advantages(roll, chunks)
        extra = obj.after_rollout(chunks)
        norm = obj.normaliser(chunks)
        loop.method.on_step_begin(model, state.step)
        total, sums, grad_norm = 0.0, {}, None
        for u in range(cfg.updates):
            for chunk in chunks:
                with autocast(loop.device, loop.precision):
                    loss_sum, stats = obj.micro_loss(model, chunk)
                (loss_sum / norm).backward()
                total += float(loss_sum.detach()) / norm / cfg.updates
                for k, v in stats.items():
                    if u == 0 or k == "clipped":
                        sums[k] = sums.get(k, 0.0) + float(v)
            if u < cfg.updates - 1:
                grad_norm = _step_without_schedule(loop, state)
        grad_norm = optimizer_step(loop, state)
        update_s = time.perf_counter() - t0
        state.step += 1
        obj.step_no = state.step   # evaluations after this step are tagged with it
        state.micro += loop.cfg.grad_accum
        state.tokens += roll.generated + sum(len(p) for p in roll.prompt_ids)
        return {"step": state.step, "split": "train", "loss": total, "lr": loop.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, **_stats(roll, chunks, sums, cfg.updates), **extra,
                "generation_s": roll.gen_s, "reward_s": roll.reward_s, "update_s": update_s,
                "generated_tokens_per_s": roll.generated / max(roll.gen_s, 1e-9)}


def _step_without_schedule(loop, state) -> float | None:
    """An optimizer step of the μ − 1 first updates: the schedule moves once per loop step."""
    sched = loop.scheduler
    loop.scheduler = _NoSchedule(sched)
    try:
        return optimizer_step(loop, state)
    finally:
        loop.scheduler = sched


class _NoSchedule:
    def __init__(self, sched):
        self.sched = sched

    def step(self):
        pass


def _stats(roll, chunks, sums: dict, updates: int) -> dict:
    tokens = max(sums.get("tokens", 0.0), 1.0)
    adv = torch.cat([c["advantages"].reshape(-1) if c["advantages"].dim() == 1
                     else c["advantages"][c["completion_mask"].bool()] for c in chunks])
    out = {"reward": float(roll.total.mean()), "reward_std": float(roll.total.std()) if roll.total.numel() > 1 else 0.0}
    for name, values in roll.values.items():
        v = torch.tensor(values)
        out[f"reward/{name}"] = float(v.mean())
        out[f"reward/{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    out.update({"entropy": sums.get("entropy", 0.0) / tokens, "clip_fraction": sums.get("clipped", 0.0) / (tokens * updates),
                "completion_length": roll.generated / max(len(roll.completion_ids), 1),
                "truncated": sum(roll.truncated) / max(len(roll.truncated), 1),
                "advantage_std": float(adv.float().std()) if adv.numel() > 1 else 0.0})
    if "kl" in sums:
        out["kl"] = sums["kl"] / tokens
    for k in sums.keys() - {"tokens", "entropy", "clipped", "kl"}:   # the objective's own (ppo: value_loss)
        out[k] = sums[k] / tokens
    return out


def stat_sums(mask, entropy, region, kl) -> dict:
    """The token sums every objective's micro_loss reports (the step turns them into means)."""
    m = mask
    out = {"tokens": m.sum(), "entropy": (entropy * m).sum(), "clipped": (region.to(m.dtype) * m).sum()}
    if kl is not None:
        out["kl"] = (kl.detach() * m).sum()
    return out

