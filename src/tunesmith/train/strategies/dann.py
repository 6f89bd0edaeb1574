"""Domain-adversarial training (Ganin et al. 2016, eq. 9-10) for classification.

f: the pooled representation (the input of the classification head, captured by a forward pre-hook),
G_d: a discriminator Linear → ReLU → Linear → 2 on R_λ(f), R_λ the gradient-reversal layer. Each
micro-batch adds ``weight`` · L_d, L_d the cross-entropy of G_d(R_λ(f)) against the domain (0: the
labelled source batch of the objective, 1: a batch of unlabelled target rows drawn in turn): G_d learns
to tell the domains apart while the reversed gradient pushes the encoder towards features it cannot.
λ follows λ_p = λ (2 / (1 + exp(-γ p)) - 1) with p the fraction of training done (schedule ganin).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...data import collate
from ...data.collate import to_device
from ...data.formats import apply_field_map
from ...data.readers import read_rows
from ...errors import ConfigError
from ...models.targets import task_heads
from . import Strategy, register
from .configs.dann import DannConfig
from .grl import reverse_gradient


def reversal_coefficient(lam: float, progress: float, schedule: str = "ganin", gamma: float = 10.0) -> float:
    if schedule == "constant":
        return lam
    return lam * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


def domain_loss(disc: nn.Module, source: torch.Tensor, target: torch.Tensor, lam: float
                ) -> tuple[torch.Tensor, float]:
    """(mean cross-entropy of disc(R_λ(f)) against domain 0 for ``source``, 1 for ``target``; its accuracy)."""
    feats = torch.cat([source, target])                         # [Bs + Bt, H]
    domains = torch.cat([torch.zeros(len(source), dtype=torch.long), torch.ones(len(target), dtype=torch.long)])
    logits = disc(reverse_gradient(feats, lam))                 # [Bs + Bt, 2]
    domains = domains.to(logits.device)
    loss = nn.functional.cross_entropy(logits.float(), domains)
    return loss, float((logits.argmax(-1) == domains).float().mean())


@register
class Dann(Strategy):
    Config = DannConfig

    def prepare(self, model, ctx) -> None:
        heads = task_heads(model)
        if ctx.objective.task != "classification" or not heads:
            raise ConfigError("strategies: dann needs a classification run (objective cls) on a model with a "
                              "classification head")
        self.head = model.get_submodule(heads[0])
        self.captured: torch.Tensor | None = None
        self.head.register_forward_pre_hook(self._capture)
        rows = read_rows(self.cfg.target, self.cfg.max_rows, "dann target file")
        texts = []
        for r in rows:
            data = apply_field_map(r, self.cfg.field_map).data
            text = data.get("text", data.get("sentence"))
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{r.loc}: dann target row needs a non-empty 'text' or 'sentence' field "
                                  f"(after strategies.dann.field_map), found keys {sorted(data)}")
            texts.append(text)
        enc = ctx.tokenizer(texts, truncation=True, max_length=ctx.max_seq_len)
        self.target = [{"input_ids": ids} for ids in enc["input_ids"]]
        self.batch_size, self.pad_id, self.device = ctx.cfg.train.batch_size, ctx.pad_id, ctx.device
        self.order = torch.randperm(len(self.target), generator=torch.Generator().manual_seed(ctx.seed)).tolist()
        self.calls, self.total = 0, max(1, ctx.total_steps * ctx.grad_accum)
        width = self._width(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)   # PyTorch's own Linear init, the same for a seed
            self.disc = nn.Sequential(nn.Linear(width, self.cfg.hidden), nn.ReLU(), nn.Linear(self.cfg.hidden, 2))
        self.disc.to(ctx.device)
        self.last: dict = {}

    def _capture(self, module, args) -> None:
        self.captured = args[0]

    def _width(self, model) -> int:
        batch = self._target_batch(0)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.captured is None or self.captured.dim() != 2:
            shape = None if self.captured is None else tuple(self.captured.shape)
            raise ConfigError(f"strategies: dann needs a head that reads one pooled vector per example (BERT-style "
                              f"encoders); this model's head reads a tensor of shape {shape}")
        return self.captured.shape[-1]

    def _target_batch(self, k: int) -> dict:
        n = len(self.target)
        idx = [self.order[(k * self.batch_size + i) % n] for i in range(self.batch_size)]
        return to_device(collate([self.target[i] for i in idx], self.pad_id), self.device)

    def parameters(self) -> list:
        return list(self.disc.parameters())

    def param_group(self, lr: float) -> dict:
        return {"params": self.parameters(), "lr": self.cfg.lr or 10 * lr, "weight_decay": 0.0}

    def loss(self, model):
        source = self.captured   # the objective's forward on the source batch has just run
        batch = self._target_batch(self.calls)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        target = self.captured
        lam = reversal_coefficient(self.cfg.lam, self.calls / self.total, self.cfg.schedule, self.cfg.gamma)
        self.calls += 1
        loss, acc = domain_loss(self.disc, source, target, lam)
        self.last = {"dann/domain_loss": float(loss.detach()), "dann/domain_accuracy": acc, "dann/lambda": lam}
        return self.cfg.weight * loss

    def metrics(self) -> dict:
        return self.last

    def state_dict(self) -> dict:
        return {**{f"disc.{k}": v for k, v in self.disc.state_dict().items()}, "calls": torch.tensor(self.calls)}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict({k[len("disc."):]: v for k, v in state.items() if k.startswith("disc.")})
        self.calls = int(state["calls"])
