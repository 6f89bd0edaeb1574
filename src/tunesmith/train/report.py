"""Run outputs: metrics.jsonl, loss.png, the end-of-run summary and peak memory."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def _record(line: str) -> dict | None:
    """A metrics line, or None for one that is not JSON (the half-written last line of a killed run)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


class MetricsLog:
    """Appends one JSON object per line. On resume, lines after the checkpoint step are dropped, and so
    is the end-of-run train probe at that step (the resumed run writes it again) and a line cut short
    when the run was killed."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            def keep(r: dict | None) -> bool:
                if r is None:
                    return False
                step = r.get("step", 0)
                return step < resume_step or (step == resume_step and (step == 0 or r.get("split") != "train_probe"))
            kept = [l for l in path.read_text().splitlines() if l and keep(_record(l))]
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


PLOTTED = ("accuracy", "rewards/margin", "margin", "rewards/chosen", "rewards/rejected")


def plot_losses(records: list[dict], path: Path) -> None:
    """Train and eval loss; beside it, when the objective logs them, accuracy, margin and rewards."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals = [r for r in records if r.get("split") == "eval"]
    tasks = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("tasks/")})  # data.mixture runs
    extra = [k for k in PLOTTED if any(k in r for r in records if r.get("split") in ("train", "eval"))]
    extra += [f"tasks/{t}/accuracy" for t in tasks if any(f"tasks/{t}/accuracy" in r for r in evals)]
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(12 if extra else 7, 4), squeeze=False)
    ax = axes[0][0]
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
        if points:
            ax.plot(*zip(*points), style, label=split, lw=1 if split == "train" else 1.5)
    for t in tasks:
        points = [(r["step"], r[f"tasks/{t}/loss"]) for r in evals if f"tasks/{t}/loss" in r]
        if points:
            ax.plot(*zip(*points), "s--", label=f"eval {t}", lw=1, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax = axes[0][1]
        for key in extra:
            for split, style in (("train", ":"), ("eval", "o-")):
                points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
                if points:
                    ax.plot(*zip(*points), style, label=f"{split} {key}", lw=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if any("reward" in r for r in records if r.get("split") == "train"):   # online RL: rl.png beside it
        from .rl.plot import plot_rl
        plot_rl(records, Path(path).with_name("rl.png"))


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_summary(s: dict) -> str:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)
    lines = [
        f"run directory      {s['run_dir']}",
        f"method             {s['method']}",
        f"parameters         {s['trainable_params']:,} trainable / {s['total_params']:,} total "
        f"({s['trainable_pct']:.4f}%)",
        f"steps              {s['steps']}  ({s['train_tokens']:,} tokens)"
        + (f", lr {s['lr']:g} ({s.get('lr_source', 'train.lr')})" if s.get("lr") is not None else "")
        + (f", head lr {s['head_lr']:g}" if s.get("head_lr") is not None else ""),
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
