"""What the preference objectives share: pair batches as rows, the policy's per-sequence log-probs, and the
reference policy.

A pair batch is either padded (``chosen_*`` and ``rejected_*`` tensors of one length: ``data.collate``) or
packed (``train.padding_free``: every pair's chosen and rejected as two documents of one row, with
``sequence`` naming each position's document: ``data.packing.collate_packed_pairs``). Either way the
model sees chosen rows 0..B-1 then rejected rows B..2B-1 in one forward pass.

The reference policy π_ref is the model before training, obtained as cheaply as the method allows
(:func:`reference_kind`): where every trained parameter lives in a method's wrapper (LoRA and its
family, adapters, (IA)³, prompt and prefix tokens, parameter-level LoRA) it is the same weights with the
wrappers disabled (``inject.disable_adapters``), never a second copy; otherwise (full, freeze, the
selective methods) a frozen copy of the model. With ``precompute_reference`` its log-probs are computed
once before training, stored in the examples (``ref_*_logps``) and cached on disk for later runs.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys

import torch
from torch import nn

from . import Objective
from ...data.collate import HOST, on_host
from ...methods import inject
from ._logps import chunked_logps, logits_logps, row_sequence, with_host
from .causal_lm import default_chunked

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_rows(batch: dict) -> tuple[dict, int]:
    """``(rows, B)``: the batch as 2B sequences (chosen then rejected), with each position's sequence
    (and their CPU copies, where the batch has its own: ``_logps.with_host``)."""
    host = batch.get(HOST) or {}
    if "chosen_input_ids" not in batch:   # packed: one row, documents already numbered
        rows = {k: v for k, v in batch.items() if k != HOST}
        rows["sequence"] = batch["sequence"].reshape(-1)
        return with_host(rows, host.get("labels"), host.get("sequence")), int(batch["pairs"])
    b = batch["chosen_input_ids"].shape[0]
    rows = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask",
                                                                                   "labels")}   # (2B, T)
    rows["sequence"] = row_sequence(rows["labels"])                     # (2B*T,)
    labels = torch.cat([host["chosen_labels"], host["rejected_labels"]]) if "chosen_labels" in host else None
    return with_host(rows, labels, None if labels is None else row_sequence(labels)), b


def pair_count(batch: dict) -> int:
    return int(batch["pairs"]) if "pairs" in batch else int(on_host(batch, "chosen_input_ids").shape[0])


def reference_kind(model: nn.Module) -> str:
    """``disabled`` when every trainable parameter lives inside a method's wrapper (disabling the wrappers
    gives the model before training), else ``copy``."""
    tuned = [n for n, _ in inject.tuned_layers(model)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    inside = all(any(n.startswith(t + ".") for t in tuned) for n in trainable)
    return "disabled" if tuned and inside else "copy"


@contextlib.contextmanager
def inference(model: nn.Module, disable: bool):
    """No gradients, dropout off, and (``disable``) the method's wrappers off, restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), (inject.disable_adapters(model) if disable else contextlib.nullcontext()):
            yield
    finally:
        model.train(was)


class Reference:
    """The reference policy's per-sequence log-probs of a row batch."""

    def __init__(self, model: nn.Module, logps_fn):
        self.kind = reference_kind(model)
        self.logps_fn = logps_fn
        self.copy = None
        if self.kind == "copy":
            self.copy = copy.deepcopy(model)
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def __call__(self, model: nn.Module, rows: dict, n: int) -> torch.Tensor:
        target = self.copy if self.copy is not None else model
        with inference(target, disable=self.copy is None):
            return self.logps_fn(target, rows, n)[0]


class PairObjective(Objective):
    """Base of the objectives on preference pairs: ``pair_loss`` maps per-sequence log-probs to losses."""

    reference_free = False

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.logps_fn = chunked_logps if default_chunked() else logits_logps
        self.reference: Reference | None = None

    def configure(self, train_cfg) -> None:
        if train_cfg.chunked_ce != "auto":
            self.logps_fn = chunked_logps if train_cfg.chunked_ce else logits_logps

    def count(self, batch):
        return pair_count(batch)

    def prepare(self, model, method, datasets, *, run) -> None:
        if self.reference_free:
            return
        if getattr(self.cfg, "precompute_reference", False):
            for ds in datasets:
                if ds is not None:
                    precompute(self, model, ds, run)
        else:
            self.reference = Reference(model, self.logps_fn)

    def reference_logps(self, model, rows: dict, batch: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if REF_KEYS[0] in batch:
            return batch[REF_KEYS[0]].float(), batch[REF_KEYS[1]].float()
        if self.reference is None:
            self.reference = Reference(model, self.logps_fn)
        ref = self.reference(model, rows, 2 * b)
        return ref[:b], ref[b:]

    def loss(self, model, batch):
        rows, b = pair_rows(batch)
        sums, counts = self.logps_fn(model, rows, 2 * b)
        ref = None if self.reference_free else self.reference_logps(model, rows, batch, b)
        losses, extra = self.pair_loss(sums[:b], sums[b:], counts[:b], counts[b:], ref)
        return losses.sum(), b, extra

    def pair_loss(self, chosen, rejected, chosen_tokens, rejected_tokens, ref):
        """Per-pair losses (B,) and the extra sums to log, from the per-sequence log-probs."""
        raise NotImplementedError


def reward_extras(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor,
                  rejected: torch.Tensor) -> dict:
    """Sums over the pairs of what every preference objective logs (the loop divides by the pair count):
    rewards, reward accuracy (a tie counts half, so equal rewards read 0.5), margin, log-probs."""
    rc, rr = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(),
            "correct": (rc > rr).float().sum() + 0.5 * (rc == rr).float().sum(), "rewards/margin": (rc - rr).sum(),
            "logps/chosen": chosen.detach().float().sum(), "logps/rejected": rejected.detach().float().sum()}


def _cache_key(ds, run) -> str:
    m = run.cfg.model
    h = hashlib.sha256(json.dumps([m.name_or_path, m.random_overrides, m.dtype, run.precision,
                                   run.cfg.train.seed if m.name_or_path.startswith("random:") else None],
                                  sort_keys=True, default=str).encode())
    for ex in ds.examples:
        h.update(json.dumps([v for k, v in sorted(ex.items()) if k not in REF_KEYS]).encode())
    return h.hexdigest()[:24]


def precompute(objective: PairObjective, model: nn.Module, ds, run) -> None:
    """Reference log-probs of every example of ``ds`` into the examples, read from (or written to) the cache."""
    from ...data import collate
    from ...data.collate import to_device
    from ...models.loader import cache_root
    from ...errors import FileError
    from ...files import torch_load
    path = cache_root() / "reference" / f"{_cache_key(ds, run)}.pt"
    saved = None
    if path.is_file():
        try:
            saved = torch_load(path)
            if not all(k in saved and len(saved[k]) == len(ds) for k in REF_KEYS):
                raise FileError(f"{path}: not the reference log-probs of these {len(ds)} examples")
            print(f"reference log-probs: {len(ds)} examples from {path}", file=sys.stderr, flush=True)
        except (FileError, TypeError) as e:   # a damaged cache is computed again
            print(f"warning: {e}; computing them again", file=sys.stderr, flush=True)
            saved = None
    if saved is None:
        disable = reference_kind(model) == "disabled"
        out = {k: [] for k in REF_KEYS}
        bs = run.train.batch_size
        with inference(model, disable):
            for i in range(0, len(ds), bs):
                batch = to_device(collate([ds[j] for j in range(i, min(i + bs, len(ds)))], run.pad_id), run.device)
                rows, b = pair_rows(batch)
                ref = objective.logps_fn(model, rows, 2 * b)[0].float().cpu()
                out[REF_KEYS[0]].append(ref[:b])
                out[REF_KEYS[1]].append(ref[b:])
        saved = {k: torch.cat(v) for k, v in out.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        print(f"reference log-probs: {len(ds)} examples computed, cached in {path}", file=sys.stderr, flush=True)
    for k in REF_KEYS:
        for ex, v in zip(ds.examples, saved[k].tolist()):
            ex[k] = float(v)
