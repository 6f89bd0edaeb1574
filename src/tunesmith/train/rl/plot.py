"""rl.png: the rewards (each function and the total, train steps and evaluations) and the KL by step."""
from __future__ import annotations

from pathlib import Path


def reward_keys(records: list[dict]) -> list[str]:
    keys = {k for r in records if r.get("split") in ("train", "eval") for k in r
            if k == "reward" or (k.startswith("reward/") and not k.endswith("_std"))}
    if len(keys) == 2:   # one reward function: its curve is the total's
        keys.discard("reward")
    return sorted(keys, key=lambda k: (k != "reward", k))


def plot_rl(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    for i, key in enumerate(reward_keys(records)):
        color = f"C{i}"
        train = [(r["step"], r[key]) for r in records if r.get("split") == "train" and key in r]
        evals = [(r["step"], r[key]) for r in records if r.get("split") == "eval" and key in r]
        if train:
            ax.plot(*zip(*train), "-", color=color, lw=1, alpha=0.5, label=f"train {key}")
            if len(train) >= 4:   # a moving mean over 4 steps
                xs, ys = zip(*train)
                mean = [sum(ys[max(0, j - 3):j + 1]) / len(ys[max(0, j - 3):j + 1]) for j in range(len(ys))]
                ax.plot(xs, mean, "-", color=color, lw=2)
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, lw=1, label=f"eval {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for key, style in (("kl", "-"), ("entropy", ":")):
        pts = [(r["step"], r[key]) for r in records if r.get("split") == "train" and key in r]
        if pts:
            (bx if key == "kl" else bx.twinx()).plot(*zip(*pts), style, color="C3" if key == "kl" else "C7",
                                                    label=key)
    bx.set_xlabel("step")
    bx.set_ylabel("KL to the reference (solid); entropy (dotted, right)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
