"""Scoring texts with a sequence-classification model: a reward model, or a classifier run.

``Scorer.score(texts)`` returns ``{"scores": [...]}``: the single logit of a one-label model (a
reward model's reward), or for a K-label classifier the probability of its last label (the
positive class of a binary one) with ``labels``, each text's probability per label name.
Served by ``POST /v1/score/evaluation`` (LLaMA-Factory's route and body: ``model``, ``messages``
as a list of texts, optional ``max_length``). Any model ``tunesmith.load`` returns as a sequence
classifier works: classification runs, classifier model directories, and reward-model runs.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from ..errors import ConfigError


class Scorer:
    def __init__(self, model, tokenizer, label_names: list[str] | None = None, batch_size: int = 16):
        if "SequenceClassification" not in type(model).__name__:
            raise ConfigError(f"a scoring model must be a sequence classifier (a reward or classification run), "
                              f"got {type(model).__name__}")
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        k = int(model.config.num_labels)
        self.labels = label_names or [str(i) for i in range(k)]
        self._lock = threading.Lock()   # one forward at a time: requests arrive on worker threads

    @classmethod
    def load(cls, path: str, device: str = "auto", dtype: str = "auto") -> "Scorer":
        from ..api import load
        model, tok = load(path, device=device, dtype=dtype)
        summary = Path(path) / "summary.json"
        names = json.loads(summary.read_text()).get("label_names") if summary.is_file() else None
        return cls(model, tok, names)

    @torch.no_grad()
    def score(self, texts: list[str], max_length: int | None = None) -> dict:
        dev = next(self.model.parameters()).device
        logits = []
        with self._lock:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], padding=True, truncation=True,
                               max_length=max_length or min(getattr(self.tok, "model_max_length", 512), 8192),
                               return_tensors="pt")
                enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                logits.append(self.model(**enc).logits.float().cpu())
        out = torch.cat(logits)
        if out.shape[-1] == 1:
            return {"scores": out[:, 0].tolist()}
        probs = out.softmax(-1)
        return {"scores": probs[:, -1].tolist(),
                "labels": [dict(zip(self.labels, row)) for row in probs.tolist()]}
