"""Evaluation: metrics (registry in :mod:`.metrics`), tasks (:mod:`.tasks`), `tunesmith eval` (:mod:`.runner`)
and the metrics computed during training (:mod:`.training`). See docs/eval.md."""
