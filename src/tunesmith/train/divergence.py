"""Divergence detection: a run whose loss, gradients or weights went bad stops with one clear message.

:class:`Divergence` looks at each optimizer step's loss and gradient norm (numbers the loop already
has) and says why the run must stop, or nothing:

* the loss or the gradient norm is not finite: at once;
* for ``patience`` steps in a row, any of
    - the loss sits at or above the level of a uniform guess, ln(outcomes) (the vocabulary for a
      language model, the classes for a classifier), while the run started clearly below it: the
      model forgot what it knew;
    - the loss is far above where the run started (more than twice the first step's loss, plus 1);
    - the gradient norm is exactly zero (saturated or dead weights: nothing is learned any more).

While such a streak is going on the run is :attr:`~Divergence.suspect` and the loop saves no
checkpoint. A step's loss is computed before its update, so the trouble first seen at step b was
caused by the weights of step b-1: checkpoints from step b-1 on are not good (the runner removes
them). :func:`nonfinite_weights` is checked before anything is saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

UNIFORM_MARGIN = 0.98   # "at the uniform level": within 2 % of ln(outcomes)
UNIFORM_GAP = 1.0       # the uniform rule applies when the run started this far (nats) below it


@dataclass
class Divergence:
    uniform: float | None       # loss of a uniform guess, ln(outcomes); None when unknown
    patience: int = 5           # bad steps in a row before the run stops
    start: float | None = None  # the first step's loss (set from the first step when None)
    streak: int = 0
    first_bad: int | None = None  # the first step of the current streak
    symptom: str | None = None    # what is wrong in the current streak
    finite_only: bool = False     # only a NaN or infinity is bad (online RL: its loss is near 0 by design and
                                  # its gradients are 0 whenever every group's rewards tie)

    @property
    def suspect(self) -> bool:
        """A streak of bad steps is going on (not yet long enough to stop)."""
        return self.streak > 0

    def observe(self, step: int, loss: float, grad_norm: float | None, final: bool = False) -> str | None:
        """Record optimizer step ``step``; the reason to stop, or None. On the ``final`` step a streak
        that has begun stops the run too (its result would be the bad weights)."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self.first_bad = step if self.first_bad is None else self.first_bad
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return f"the {what} became {loss if what == 'loss' else grad_norm} at step {step}"
        if self.start is None:
            self.start = loss
        bad = self._symptom(loss, grad_norm)
        if bad is None:
            self.streak, self.first_bad, self.symptom = 0, None, None
            return None
        self.streak, self.symptom = self.streak + 1, bad
        self.first_bad = step if self.first_bad is None else self.first_bad
        if self.streak >= self.patience:
            return f"{bad} for {self.streak} steps in a row (steps {self.first_bad}-{step})"
        if final:
            return f"{bad} at the end of the run (steps {self.first_bad}-{step})"
        return None

    def _symptom(self, loss: float, grad_norm: float | None) -> str | None:
        if self.finite_only:
            return None
        u, s = self.uniform, self.start
        if u is not None and s < u - UNIFORM_GAP and loss >= UNIFORM_MARGIN * u:
            return (f"the loss sat at {loss:.4f}, the level of a uniform guess (ln {math.exp(u):,.0f} = {u:.4f}), "
                    f"after starting at {s:.4f}")
        if loss > 2 * s + 1:
            return f"the loss rose to {loss:.4f}, far above its start ({s:.4f})"
        if grad_norm == 0.0:
            return f"the gradients were all zero (loss {loss:.4f})"
        return None


def nonfinite_weights(named_params) -> list[str]:
    """Names of the trainable tensors holding a NaN or an infinity (one device sync)."""
    import torch
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    return [n for (n, _), good in zip(named, ok.tolist()) if not good]
