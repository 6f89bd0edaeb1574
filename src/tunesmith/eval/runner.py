"""`tunesmith eval` end to end: read and check the data, load the model, predict, score, write.

Everything the user gave is checked before the model loads and before anything is written: the
task, the metrics, the data file and its rows, the demonstration file of ``--shots``. The output
directory then holds ``predictions.jsonl`` (one record per row, the keys of
:mod:`tunesmith.eval.metrics`), ``results.json`` (the metrics and what was evaluated) and, for
classification, ``confusion_matrix.png``.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.formats import apply_field_map, detect_format, normalize
from ..data.readers import first_readable, read_rows
from ..errors import ConfigError, ModelError
from . import metrics as metrics_mod
from . import tasks as tasks_mod

MAX_NEW_TOKENS = {"classification": 8}   # the default for generated answers of other tasks: 128


@dataclass
class EvalOptions:
    model: str
    data: str
    task: str = "auto"
    metrics: list[str] | None = None
    batch_size: int = 8
    max_samples: int | None = None
    max_new_tokens: int | None = None
    max_seq_len: int = 1024
    out: str | None = None
    shots: int = 0
    shots_from: str | None = None
    seed: int = 0
    label_names: list[str] | None = None
    field_map: dict[str, str] = field(default_factory=dict)
    format: str = "auto"
    system_prompt: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


def read_data(path: str, fmt: str, field_map: dict, max_rows: int | None, what: str) -> tuple[list, str]:
    """``(loc, canonical row)`` pairs of ``path`` and their format; DataError naming FILE:LINE otherwise."""
    raw = [apply_field_map(r, field_map) for r in read_rows(path, max_rows, what)]
    fmt = detect_format(first_readable(raw)) if fmt == "auto" else fmt
    return [(r.loc, normalize(r, fmt)) for r in raw], fmt


def sample_demos(rows: list, k: int, seed: int, fmt: str) -> list:
    """``k`` demonstrations drawn from ``rows`` with ``seed``; classification rows take the labels in turn."""
    if k > len(rows):
        raise ConfigError(f"--shots {k}: the --shots-from file has only {len(rows)} rows")
    rng = random.Random(seed)
    if fmt != "classification":
        return rng.sample(rows, k)
    groups: dict[str, list] = {}
    for item in rows:
        groups.setdefault(str(item[1]["label"]), []).append(item)
    for g in groups.values():
        rng.shuffle(g)
    order = sorted(groups)
    picked = [groups[order[i % len(order)]][i // len(order)] for i in range(k)
              if i // len(order) < len(groups[order[i % len(order)]])]
    rng.shuffle(picked)
    return picked


def _check(opts: EvalOptions):
    if opts.batch_size < 1 or (opts.max_samples is not None and opts.max_samples < 1):
        raise ConfigError("--batch-size and --max-samples must be >= 1")
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if opts.shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {opts.shots}")
    if opts.task != "auto":
        tasks_mod.get(opts.task)
    rows, fmt = read_data(opts.data, opts.format, opts.field_map, opts.max_samples, "--data file")
    task = tasks_mod.for_format(fmt) if opts.task == "auto" else tasks_mod.get(opts.task)
    tasks_mod.check_format(task, fmt, opts.data)
    names = metrics_mod.check(opts.metrics or metrics_mod.defaults(task.name), task.name)
    demos = []
    if opts.shots:
        if not opts.shots_from:
            raise ConfigError("--shots K needs --shots-from TRAIN_FILE to draw the demonstrations from")
        if task.name not in ("classification", "generation"):
            raise ConfigError(f"--shots: demonstrations are for classification and generation, not {task.name}")
        pool, demo_fmt = read_data(opts.shots_from, fmt, opts.field_map, None, "--shots-from file")
        demos = sample_demos(pool, opts.shots, opts.seed, demo_fmt)
    elif opts.shots_from:
        raise ConfigError("--shots-from is read only with --shots K (K >= 1)")
    return rows, fmt, task, names, demos


def _check_model(model: str) -> None:
    p = Path(model).expanduser()
    if not p.exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        raise ModelError(f"MODEL_OR_RUN {model!r} does not exist; give a run directory, adapter, model directory, "
                         ".gguf file or embedded name (smollm2-135m, minilm-l6)")


def default_out(opts: EvalOptions, task: str | None = None) -> Path:
    """``RUN/eval/DATA`` or ``runs/eval/MODEL-DATA``, with ``-TASK`` when ``task`` is not the one the data's
    format picks (``--task lm`` on alpaca rows does not overwrite their generation results), ``-Kshot``, and
    ``-M1_M2`` for metrics asked for by name (``--metrics``), so that each set of results keeps its folder."""
    stem = Path(opts.data).stem + (f"-{task}" if task else "") + (f"-{opts.shots}shot" if opts.shots else "")
    stem += f"-{'_'.join(opts.metrics)}" if opts.metrics else ""
    p = Path(opts.model)
    if (p / "config.yaml").is_file():
        return p / "eval" / stem
    return Path("runs") / "eval" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', p.name or opts.model)}-{stem}"


def _auto_task(fmt: str) -> str | None:
    try:
        return tasks_mod.for_format(fmt).name
    except ConfigError:
        return None


def _run_label_names(model: str) -> list[str] | None:
    summary = Path(model) / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("label_names")
    return None


def evaluate(opts: EvalOptions) -> dict:
    """Evaluate ``opts.model`` on ``opts.data``; returns results.json's content."""
    t0 = time.perf_counter()
    rows, fmt, task, names, demos = _check(opts)
    _check_model(opts.model)
    from ..api import load
    from ..infer.engine.text import run_defaults
    from ..models.loader import quiet_progress
    with quiet_progress(not opts.progress):
        model, tokenizer = load(opts.model, device=opts.device, dtype=opts.dtype)
    defaults = run_defaults(opts.model)
    labels = opts.label_names or _run_label_names(opts.model)
    inputs = tasks_mod.Inputs(
        model=model, tokenizer=tokenizer, rows=rows, fmt=fmt, batch_size=opts.batch_size,
        max_new_tokens=opts.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 128), max_seq_len=opts.max_seq_len,
        label_names=labels, demos=demos,
        system_prompt=opts.system_prompt if opts.system_prompt is not None else defaults["system_prompt"],
        layout=defaults["layout"], progress=opts.progress)
    if task.name == "classification":   # the label order of metrics and plots: the model's, else the data's
        from .classification import label_names_for
        labels = label_names_for(inputs)[0]
        _check_demo_labels(demos, inputs)
    records = task.predict(inputs)
    values = metrics_mod.compute(names, records, labels=labels)
    out = Path(opts.out) if opts.out else default_out(opts, None if task.name == _auto_task(fmt) else task.name)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if "confusion_matrix" in values:
        plot_confusion(values["confusion_matrix"], labels, out / "confusion_matrix.png",
                       title=f"{Path(opts.model).name or opts.model} on {Path(opts.data).name}")
    result = {"model": opts.model, "data": opts.data, "task": task.name, "format": fmt, "rows": len(records),
              "shots": opts.shots, "shots_from": opts.shots_from, "metrics": values, "label_names": labels,
              "demonstrations": [loc for loc, _ in demos], "options": asdict(opts),
              "time_s": time.perf_counter() - t0, "out": str(out)}
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def _check_demo_labels(demos, inputs) -> None:
    from .classification import label_names_for
    _, mapping = label_names_for(inputs)
    bad = next(((loc, r["label"]) for loc, r in demos if r["label"] not in mapping), None)
    if bad:
        raise ConfigError(f"{bad[0]}: demonstration label {bad[1]!r} is not a label of the evaluation data")


def format_table(result: dict) -> str:
    """The printed table: one line per value, per-class values as a small table, the confusion matrix."""
    values = result["metrics"]
    shots = f", {result['shots']}-shot" if result["shots"] else ""
    lines = [f"{result['task']} evaluation of {result['model']} on {result['data']} ({result['rows']} rows{shots})"]
    per_class = {k[:-len("_per_class")]: v for k, v in values.items() if k.endswith("_per_class")}
    for k, v in values.items():
        if isinstance(v, (int, float)):
            lines.append(f"  {k:<18} {v:.4f}" if isinstance(v, float) else f"  {k:<18} {v}")
    if per_class:
        names = list(next(iter(per_class.values())))
        w = max(8, *(len(n) for n in names))
        lines.append("  " + f"{'label':<{w}}" + "".join(f"{m:>11}" for m in per_class))
        lines += ["  " + f"{n:<{w}}" + "".join(f"{per_class[m][n]:>11.4f}" for m in per_class) for n in names]
    if "confusion_matrix" in values:
        names = result["label_names"]
        w = max(6, *(len(n) for n in names))
        lines.append("  confusion matrix (rows: true, columns: predicted)")
        lines.append("  " + " " * w + "".join(f"{n:>{w + 2}}" for n in names))
        lines += ["  " + f"{n:<{w}}" + "".join(f"{c:>{w + 2}}" for c in row)
                  for n, row in zip(names, values["confusion_matrix"])]
    lines.append(f"  written to {result['out']} (predictions.jsonl, results.json)")
    return "\n".join(lines)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2.5), max(3.5, 0.6 * n + 2)))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
