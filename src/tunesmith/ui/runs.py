"""What the Runs tab shows: every run directory under the runs directory, read from its files.

A run's status comes from its ``summary.json`` (``completed``; ``failed`` with the reason, which
``interrupted`` makes ``stopped``) or, while there is none, from the UI's job (``running``, or
``failed`` with the CLI's error line) and its checkpoints (``stopped``: resumable).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .jobs import STATE, Jobs, bar_progress, error_line

#: summary.json fields the runs table shows, in order.
METRICS = ["steps", "trainable_pct", "train_loss_before", "train_loss_after", "eval_loss_before", "eval_loss_after",
           "eval_accuracy_after", "tokens_per_s", "time_s", "peak_memory_gib", "artifact_bytes"]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def metrics(run_dir: Path, since: int = 0) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines()[since:]:
        try:
            out.append(json.loads(line))
        except ValueError:   # the line being written
            break
    return out


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def status(run_dir: Path, job, meta: dict | None, log: str) -> tuple[str, str | None]:
    summary = _json(run_dir / "summary.json") or {}
    if job is not None and job.alive:
        return ("stopping" if job.stopping else "running"), None
    if summary.get("status") == "completed":
        return "completed", None
    if summary.get("status") == "failed":
        reason = summary.get("reason")
        return ("stopped" if reason == "interrupted" else "failed"), reason
    if job is None and meta and meta.get("returncode") is None and _alive(meta.get("pid")):
        return "running", None       # started by an earlier UI process, still going
    rc = job.returncode if job is not None else (meta or {}).get("returncode")
    if rc not in (None, 0):
        return "failed", error_line(log) or f"tunesmith train exited with status {rc}"
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return "stopped", None
    return ("incomplete" if (run_dir / "config.yaml").is_file() else "unknown"), None


def _alive(pid) -> bool:
    import os
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, OSError):
        return False


def names(jobs: Jobs) -> list[str]:
    root = jobs.runs_dir
    found = set(jobs.known()) | set(jobs.jobs)
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name != STATE and (d / "config.yaml").is_file():
                found.add(d.name)
    return sorted(found, key=lambda n: -_mtime(root / n))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def describe(jobs: Jobs, name: str, since: int | None = None) -> dict:
    """One run: status, method, model, summary metrics, progress and (``since`` given) its new metrics lines."""
    run_dir = jobs.runs_dir / name
    job, meta = jobs.jobs.get(name), jobs.known().get(name)
    log_path = jobs.log_of(name)
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    state, reason = status(run_dir, job, meta, log)
    cfg = _config(run_dir)
    summary = _json(run_dir / "summary.json") or {}
    method = cfg.get("method") or {}
    records = metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    out = {"name": name, "dir": str(run_dir), "status": state, "reason": reason,
           "method": method.get("name") if isinstance(method, dict) else method,
           "model": (cfg.get("model") or {}).get("name_or_path"),
           "objective": (cfg.get("train") or {}).get("objective"),
           "summary": {k: summary.get(k) for k in METRICS if k in summary},
           "artifact": next((a for a in ("adapter", "model", "delta") if (run_dir / a).is_dir()), None),
           "resumable": state in ("stopped", "failed", "incomplete") and (run_dir / "checkpoints").is_dir()
           and any((run_dir / "checkpoints").iterdir()),
           "has_log": bool(log)}
    bar = bar_progress(log) or {}
    last = train[-1] if train else {}
    out["progress"] = {"step": last.get("step", bar.get("step", 0)), "total": bar.get("total") or
                       (cfg.get("train") or {}).get("max_steps"), "loss": last.get("loss"),
                       "tokens_per_s": last.get("tokens_per_s"), "eta": bar.get("eta"), "elapsed": bar.get("elapsed")}
    if since is not None:
        out["metrics"] = records[since:]
        out["metrics_total"] = len(records)
        out["log_tail"] = _tail(log)
    return out


def _tail(log: str, n: int = 30) -> str:
    """The last lines of a log as a terminal shows them (each progress-bar redraw replaces the last)."""
    lines = [([s for s in seg.split("\r") if s.strip()] or [""])[-1] for seg in log.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines[-n:])


def listing(jobs: Jobs) -> list[dict]:
    return [describe(jobs, n) for n in names(jobs)]
