"""The comparison's PNG plots: the task metric against trainable % (log x), loss curves, memory bars."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw(rows, out: Path) -> list[Path]:
    """metric_vs_trainable.png, losses.png and memory.png under ``out``; returns their paths."""
    ok = [r for r in rows if r.status == "completed"]
    return [p for p in (_metric(ok, out / "metric_vs_trainable.png"), _losses(ok, out / "losses.png"),
                        _memory(ok, out / "memory.png")) if p]


def _metric(rows, path: Path) -> Path | None:
    pts = [r for r in rows if r.metric is not None and r.trainable_pct]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(r.trainable_pct, r.metric, s=30)
        ax.annotate(r.method, (r.trainable_pct, r.metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(pts[0].metric_name)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _losses(rows, path: Path) -> Path | None:
    curves = [r for r in rows if r.losses]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in curves:
        steps, losses = zip(*r.losses)
        ax.plot(steps, losses, lw=1, label=r.method)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory(rows, path: Path) -> Path | None:
    bars = [r for r in rows if r.peak_memory_gib is not None]
    if not bars:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r.method for r in bars], [r.peak_memory_gib for r in bars], color="tab:blue")
    ax.set_ylabel("peak memory (GiB)")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
