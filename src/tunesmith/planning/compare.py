"""``tunesmith compare``: one task trained with each of several methods under the same data, budget and seed.

Each method runs in its own process (``tunesmith train``), so that its peak memory is its own and a
method that fails (an error, a divergence, a crash) leaves its row with the reason while the others
still run. The runs sit in ``OUT/runs/<method>``; a run whose ``summary.json`` says ``completed`` is
reused on the next call (so an interrupted comparison resumes where it stopped), any other is run
again. The table comes from each run's ``summary.json`` and ``metrics.jsonl``: trainable %, the
task metric (accuracy and any F1 the evaluation logged for classification, else the eval loss),
train time, tokens/s, peak memory and the artifact's size. It is written as ``compare.md`` and
``compare.json`` beside three PNG plots (planning/plots.py).

Every method trains at its own default learning rate (``MethodConfig.learning_rate``) unless
``same_lr`` is set: one ``train.lr`` for methods that need rates 300x apart would compare the rate,
not the method.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import config as config_mod
from ..config import RunConfig
from ..errors import ConfigError
from ..methods import registry


@dataclass
class Row:
    """One method's line of the comparison (``error`` set when the run failed)."""
    method: str
    status: str = "completed"
    error: str | None = None
    lr: float | None = None
    head_lr: float | None = None   # a classification head's own rate (None: no head, or lr)
    trainable_params: int | None = None
    trainable_pct: float | None = None
    metric_name: str | None = None
    metric: float | None = None
    metrics: dict = field(default_factory=dict)
    eval_loss: float | None = None
    train_time_s: float | None = None
    time_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_gib: float | None = None
    artifact_bytes: int | None = None
    reused: bool = False
    run_dir: str | None = None
    losses: list = field(default_factory=list)   # [(step, train loss)] for the overlaid curves


def parse_methods(spec: str) -> list[str]:
    """``all`` (every registered method this machine can run) or a comma-separated list, checked."""
    configs = registry.all_configs()
    if spec.strip() == "all":
        return [n for n in configs if registry.get(n).available()]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("--methods: give a comma-separated list (e.g. lora,dora,prefix) or 'all'")
    for n in names:
        registry.config_class(n)  # ConfigError naming the valid methods
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods {spec!r}: a method is named twice")
    return names


def parse_options(items: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``["fishmask.fisher_samples=256", ...]`` → ``{"fishmask": {"fisher_samples": 256}}`` (values as YAML)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, value = config_mod._split(item)
        name, _, option = key.partition(".")
        if not option or name not in methods:
            raise ConfigError(f"--option {item!r}: expected METHOD.FIELD=VALUE for one of {', '.join(methods)}")
        out.setdefault(name, {})[option] = value
    return out


def method_config(base: RunConfig, name: str, same_lr: bool, options: dict | None = None) -> dict:
    """The run config of method ``name``: the base config, its method section swapped for ``name``'s
    (its own options kept when the base already uses that method) plus ``options``."""
    data = base.model_dump(mode="json")
    data["method"] = {**(data["method"] if base.method.name == name else {"name": name}), **(options or {})}
    if not same_lr:
        data["train"]["lr"] = None
    return data


def _done(run_dir: Path) -> dict | None:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if s.get("status") == "completed" else None


def run_method(data: dict, run_dir: Path, log_path: Path, timeout_s: float | None = None) -> dict:
    """Train one method in a child ``tunesmith train`` process; its summary, or a failed one with the reason."""
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {**data, "output": {**data["output"], "dir": str(run_dir)}}
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(config_mod.dump(config_mod.validate(data, str(cfg_path))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with log_path.open("w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(cfg_path)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    done = _done(run_dir)
    if done:
        return done
    try:
        failed = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        failed = {}
    reason = failed.get("reason") or (f"stopped after the time limit of {timeout_s:.0f} s" if rc is None
                                      else _last_error(log_path.read_text(errors="replace")) or f"exit code {rc}")
    return {"status": "failed", "reason": reason, **{k: v for k, v in failed.items() if k not in ("status", "reason")}}


def _last_error(log: str) -> str | None:
    """The ``error: ...`` line the CLI printed, else the last line of a traceback."""
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    for l in reversed(lines):
        if l.startswith("error: "):
            return l[len("error: "):]
    return lines[-1][:500] if lines else None


def metrics_of(run_dir: Path) -> tuple[dict, list]:
    """(the last evaluation's metrics, [(step, train loss)]) from a run's metrics.jsonl."""
    evals, losses = [], []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r.get("split") == "eval":
            evals.append(r)
        elif r.get("split") == "train" and r.get("loss") is not None:
            losses.append((r["step"], r["loss"]))
    last = {k: v for k, v in (evals[-1] if evals else {}).items()
            if k not in ("step", "split") and isinstance(v, (int, float))}
    return last, losses


def task_metric(last_eval: dict) -> tuple[str | None, float | None]:
    """The headline metric: macro-F1 beside accuracy for classification, else the eval loss."""
    for key in ("accuracy", "exact_match", "rougeL"):
        if key in last_eval:
            return key, last_eval[key]
    return ("eval_loss", last_eval["loss"]) if "loss" in last_eval else (None, None)


def row_of(name: str, summary: dict, run_dir: Path, reused: bool) -> Row:
    last, losses = metrics_of(run_dir)
    metric_name, metric = task_metric(last)
    row = Row(method=name, status=summary.get("status", "failed"), reused=reused, run_dir=str(run_dir),
              losses=losses, metrics=last, metric_name=metric_name, metric=metric, eval_loss=last.get("loss"))
    if row.status != "completed":
        row.error = summary.get("reason") or "failed"
    for f in ("lr", "head_lr", "trainable_params", "trainable_pct", "train_time_s", "time_s", "tokens_per_s",
              "peak_memory_gib", "artifact_bytes"):
        setattr(row, f, summary.get(f))
    return row


def compare(base: RunConfig, methods: list[str], out: Path, *, same_lr: bool = False, options: dict | None = None,
            timeout_s: float | None = None, say=print) -> list[Row]:
    """Train ``base`` with each method (reusing completed runs under ``out``); write the table and plots."""
    configs = {n: method_config(base, n, same_lr, (options or {}).get(n)) for n in methods}
    for n, data in configs.items():  # every method's options checked before the first run starts
        config_mod.validate(data, f"--methods {n}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(methods, 1):
        run_dir = out / "runs" / name
        summary, reused = _done(run_dir), True
        if summary is None:
            say(f"[{i}/{len(methods)}] {name}: training ({run_dir})")
            t0 = time.perf_counter()
            summary, reused = run_method(configs[name], run_dir,
                                         out / "runs" / f"{name}.log", timeout_s), False
            say(f"[{i}/{len(methods)}] {name}: {summary['status']} in {time.perf_counter() - t0:.0f} s"
                + (f" ({summary['reason']})" if summary["status"] != "completed" else ""))
        else:
            say(f"[{i}/{len(methods)}] {name}: reusing the completed run in {run_dir}")
        rows.append(row_of(name, summary, run_dir, reused))
        write(rows, out)  # the table so far, after every method
    from . import plots
    plots.draw(rows, out)
    return rows


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[Row]) -> str:
    f1_keys = sorted({k for r in rows for k in r.metrics if "f1" in k.lower()})
    head = (["method", "lr", "trainable %", "metric"] + f1_keys
            + ["eval loss", "train s", "tokens/s", "peak GiB", "artifact MiB", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metric = "-" if r.metric is None else f"{r.metric_name} {r.metric:.4f}"
        status = "ok" + (" (reused)" if r.reused else "") if r.status == "completed" else f"failed: {r.error}"
        lr = _f(r.lr, "g") + (f" (head {r.head_lr:g})" if r.head_lr is not None and r.head_lr != r.lr else "")
        cells = ([f"`{r.method}`", lr, _f(r.trainable_pct, ".4f"), metric]
                 + [_f(r.metrics.get(k), ".4f") for k in f1_keys]
                 + [_f(r.eval_loss, ".4f"), _f(r.train_time_s, ".0f"), _f(r.tokens_per_s, ".0f"),
                    _f(r.peak_memory_gib, ".2f"), _f(None if r.artifact_bytes is None else r.artifact_bytes / 2**20, ".2f"),
                    status.replace("|", "/").replace("\n", " ")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[Row], out: Path) -> None:
    (out / "compare.md").write_text(markdown(rows))
    (out / "compare.json").write_text(json.dumps([{k: v for k, v in asdict(r).items() if k != "losses"}
                                                  for r in rows], indent=2))
