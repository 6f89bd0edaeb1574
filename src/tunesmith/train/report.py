"""Run outputs: metrics.jsonl, loss.png, the end-of-run summary and peak memory."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


class MetricsLog:
    """Appends one JSON object per line. On resume, lines after the checkpoint step are dropped, and so
    is the end-of-run train probe at that step (the resumed run writes it again)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            def keep(r: dict) -> bool:
                step = r.get("step", 0)
                return step < resume_step or (step == resume_step and (step == 0 or r.get("split") != "train_probe"))
            kept = [l for l in path.read_text().splitlines() if l and keep(json.loads(l))]
            path.write_text("".join(l + "\n" for l in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l] if self.path.is_file() else []


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval"]
    series = eval_series(records)   # train.eval_metrics: a second panel beside the loss
    fig, axes = plt.subplots(1, 2 if series else 1, figsize=(12 if series else 7, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if series:
        _plot_metrics(axes[0][1], series)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_metrics(ax, series: dict) -> None:
    """Metrics within [0, 1] on the left axis, the others (BLEU, perplexity) on a second one."""
    unit = {k: v for k, v in series.items() if all(0 <= y <= 1 for _, y in v)}
    other = {k: v for k, v in series.items() if k not in unit}
    for k, v in unit.items():
        ax.plot(*zip(*v), "o-", label=k, lw=1.2, ms=3)
    ax.set_ylabel("eval metric")
    if other:
        ax2 = ax.twinx()
        for k, v in other.items():
            ax2.plot(*zip(*v), "s--", label=k, lw=1.2, ms=3, color=f"C{len(unit) + list(other).index(k)}")
        ax2.set_ylabel(", ".join(other))
        ax2.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if unit:
        ax.legend(loc="lower left", fontsize=8)


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def eval_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each evaluation metric other than the loss (scalar values only): [(step, value), ...]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("split") != "eval":
            continue
        for k, v in r.items():
            if k not in ("step", "split", "loss", "no_label") and _scalar(v):
                out.setdefault(k, []).append((r["step"], v))
    return out


def format_summary(s: dict) -> str:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)
    lines = [
        f"run directory      {s['run_dir']}",
        f"method             {s['method']}",
        f"parameters         {s['trainable_params']:,} trainable / {s['total_params']:,} total "
        f"({s['trainable_pct']:.4f}%)",
        f"steps              {s['steps']}  ({s['train_tokens']:,} tokens)",
        f"train loss         {f(s.get('train_loss_before'))} -> {f(s.get('train_loss_after'))}  "
        f"(the same {s.get('train_probe_batches', 4)} training batches, before and after training)",
        f"last step loss     {f(s.get('last_step_loss'))}  (mean of the last {s.get('last_steps_n', 0)} steps: "
        f"{f(s.get('last_steps_mean_loss'))})",
        f"eval loss          {f(s.get('eval_loss_before'))} -> {f(s.get('eval_loss_after'))}",
    ]
    if s.get("eval_accuracy_after") is not None:
        lines.append(f"eval accuracy      {f(s.get('eval_accuracy_before'))} -> {f(s.get('eval_accuracy_after'))}")
    if s.get("eval_f1_macro_after") is not None:
        lines.append(f"eval macro-F1      {f(s.get('eval_f1_macro_before'))} -> {f(s.get('eval_f1_macro_after'))}")
    shown = {"loss", "accuracy", "f1_macro"}
    more = {k: v for k, v in (s.get("eval_metrics_after") or {}).items() if k not in shown and _scalar(v)}
    if more:
        lines.append("eval metrics       " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in more.items()))
    if s.get("data_skipped"):
        lines.append(f"rows skipped       {s['data_skipped']}")
    lines += [
        f"time               {s['time_s']:.1f} s, {s['train_time_s']:.1f} s of it training "
        f"({s['tokens_per_s']:.0f} tokens/s)" + (f"; this session {s['session_time_s']:.1f} s"
                                                 if s.get("session_time_s", s["time_s"]) < s["time_s"] else ""),
        f"peak memory        {s['peak_memory_gib']:.2f} GiB ({s['device']})",
    ]
    sp = s.get("speed") or {}
    if sp.get("mode") == "auto" and sp.get("predicted_peak_gib") is not None:
        measured = sp.get("measured_peak_gib")
        lines.append(f"speed: auto        {sp.get('reason', '')}; first step's peak "
                     f"{'-' if measured is None else format(measured, '.1f')} GiB")
    lines += [
        f"optimizer state    {s.get('optimizer_state_bytes', 0) / 2**20:.2f} MiB",
        f"saved              {s['artifact']}  ({s.get('artifact_bytes', 0) / 2**20:.2f} MiB)",
    ]
    return "\n".join(lines)
