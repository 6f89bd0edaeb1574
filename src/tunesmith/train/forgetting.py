"""The forgetting matrix of a staged run: R[i][j], task j's metric after stage i, and average forgetting.

With accuracy (higher is better) the forgetting of task j after the last stage T is
f_j = max_{l < T} R[l][j] - R[T][j] (Chaudhry et al. 2018, eq. 5), and the average forgetting is the mean
of f_j over the tasks of the stages before the last. With a loss (lower is better) it is
f_j = R[T][j] - min_{l < T} R[l][j]. Row ``start`` holds the metrics before the first stage trained.
"""
from __future__ import annotations

import json
from pathlib import Path


def average_forgetting(matrix: list[list[float]], higher_is_better: bool = True) -> tuple[float | None, list[float]]:
    """(mean forgetting over tasks 0..T-2, per-task forgetting) of ``matrix`` [stage][task], stages = tasks in
    order (the row of stage i is the metrics after training task i)."""
    t = len(matrix) - 1
    per = []
    for j in range(t):
        best = max(matrix[l][j] for l in range(t)) if higher_is_better else min(matrix[l][j] for l in range(t))
        per.append(best - matrix[t][j] if higher_is_better else matrix[t][j] - best)
    return (sum(per) / len(per) if per else None), per


def _final_eval(run_dir: Path, first: bool = False) -> dict:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l]
    evals = [r for r in rows if r.get("split") == "eval"]
    return evals[0] if first else evals[-1]


def write_matrix(names: list[str], run_dirs: list[Path], root: Path) -> dict:
    """forgetting.json, forgetting.md and forgetting.png under ``root``; returns what forgetting.json holds."""
    last = [_final_eval(d) for d in run_dirs]
    metric = "accuracy" if all(f"tasks/{n}/accuracy" in last[0] for n in names) else "loss"
    higher = metric == "accuracy"
    start = _final_eval(run_dirs[0], first=True)
    row = lambda rec: [rec.get(f"tasks/{n}/{metric}") for n in names]  # noqa: E731
    matrix = [row(r) for r in last]
    avg, per = average_forgetting(matrix, higher)
    out = {"metric": metric, "tasks": names, "start": row(start), "matrix": matrix,
           "forgetting": dict(zip(names, per)), "average_forgetting": avg}
    root.mkdir(parents=True, exist_ok=True)
    (root / "forgetting.json").write_text(json.dumps(out, indent=2))
    (root / "forgetting.md").write_text(markdown(out))
    plot(out, root / "forgetting.png")
    return out


def markdown(out: dict) -> str:
    names, metric = out["tasks"], out["metric"]
    lines = [f"| {metric} after stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines.append("| start | " + " | ".join(f"{v:.4f}" for v in out["start"]) + " |")
    for n, row in zip(names, out["matrix"]):
        lines.append(f"| {n} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    avg = out["average_forgetting"]
    lines.append("")
    lines.append(f"average forgetting ({metric}): " + ("-" if avg is None else f"{avg:.4f}"))
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = out["tasks"]
    rows = [out["start"]] + out["matrix"]
    labels = ["start"] + [f"after {n}" for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(rows, cmap="viridis" if out["metric"] == "accuracy" else "viridis_r", aspect="auto")
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel(f"task ({out['metric']})")
    avg = out["average_forgetting"]
    ax.set_title("average forgetting " + ("-" if avg is None else f"{avg:.3f}"), fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
