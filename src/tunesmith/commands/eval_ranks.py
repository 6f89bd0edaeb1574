"""`tunesmith eval-ranks RUN_DIR`: evaluate a DyLoRA run at every rank, as one table and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path


def add(subparsers) -> None:
    p = subparsers.add_parser("eval-ranks", help="evaluate a DyLoRA run at every rank (table + ranks.png)")
    p.add_argument("run_dir", help="run directory of a dylora run")
    p.add_argument("--ranks", help="ranks to evaluate: 'all' (1..r_max), a range '2-8' or a list '1,4,8' "
                                   "(default: r_min..r_max)")
    p.add_argument("--split", choices=["validation", "train"], default="validation",
                   help="data to evaluate on (validation falls back to train when the run has none)")
    p.add_argument("--batches", type=int, help="cap on evaluation batches (default: the whole split)")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    res = eval_ranks(Path(args.run_dir), ranks=args.ranks, split=args.split, max_batches=args.batches)
    print(format_table(res))
    print(f"plot: {res['plot']}")


def parse_ranks(spec: str | None, r_min: int, r_max: int) -> list[int]:
    from ..errors import ConfigError
    if spec is None:
        return list(range(r_min, r_max + 1))
    try:
        if spec == "all":
            ranks = list(range(1, r_max + 1))
        elif "-" in spec:
            lo, hi = (int(v) for v in spec.split("-", 1))
            ranks = list(range(lo, hi + 1))
        else:
            ranks = sorted({int(v) for v in spec.split(",")})
    except ValueError:
        raise ConfigError(f"--ranks {spec!r}: expected 'all', a range like 2-8 or a list like 1,4,8") from None
    bad = [b for b in ranks if not 1 <= b <= r_max]
    if bad or not ranks:
        raise ConfigError(f"--ranks {spec!r}: ranks must lie in 1..{r_max} (this run's r_max); got {bad or ranks}")
    return ranks


def eval_ranks(run_dir: Path, *, ranks: str | None = None, split: str = "validation",
               max_batches: int | None = None) -> dict:
    """Loss (and accuracy for classification) of the base model and of every rank; writes ranks.json/png."""
    from .. import api, config as config_mod
    from ..data import build_datasets, pad_id_for
    from ..errors import ConfigError
    from ..methods.dylora import set_rank
    from ..methods.inject import disable_adapters
    from ..train import objectives
    from ..train.loop import Batches, evaluate
    from ..train.runner import precision_for

    cfg = config_mod.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if cfg is None or cfg.method.name != "dylora":
        what = f"method {cfg.method.name!r}" if cfg else "no config.yaml"
        raise ConfigError(f"eval-ranks: {run_dir} is not a dylora run ({what}); it needs a run directory "
                          "trained with method.name: dylora")
    objective = objectives.get(cfg.objective or cfg.train.objective)
    model, tokenizer = api.load(run_dir, device=cfg.model.device)
    train_ds, val_ds, _ = build_datasets(cfg.data, tokenizer, max_seq_len=cfg.train.max_seq_len,
                                         objective=objective.cfg, seed=cfg.train.seed)
    used = "validation" if split == "validation" and val_ds else "train"
    ds = val_ds if used == "validation" else train_ds
    device = next(model.parameters()).device
    precision = precision_for(cfg, device)
    batches = lambda: Batches(ds, cfg.train.batch_size, cfg.train.seed, pad_id_for(tokenizer), device).iterate(max_batches)  # noqa: E731
    with disable_adapters(model):
        base = evaluate(model, objective, batches(), precision, device)
    rows = []
    for b in parse_ranks(ranks, cfg.method.r_min, cfg.method.r_max):
        set_rank(model, b)
        rows.append({"rank": b, **evaluate(model, objective, batches(), precision, device)})
    res = {"run_dir": str(run_dir), "split": used, "base": base, "ranks": rows,
           "plot": str(run_dir / "ranks.png")}
    (run_dir / "ranks.json").write_text(json.dumps(res, indent=2))
    _plot(res, run_dir / "ranks.png")
    return res


def format_table(res: dict) -> str:
    keys = [k for k in ("loss", "accuracy") if k in res["base"]]
    head = f"{'rank':>6}  " + "  ".join(f"{k:>10}" for k in keys)
    lines = [f"DyLoRA {res['run_dir']} on {res['split']}", head,
             f"{'base':>6}  " + "  ".join(f"{res['base'][k]:>10.4f}" for k in keys)]
    lines += [f"{r['rank']:>6}  " + "  ".join(f"{r[k]:>10.4f}" for k in keys) for r in res["ranks"]]
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [r["rank"] for r in res["ranks"]]
    ax.plot(ranks, [r["loss"] for r in res["ranks"]], "o-", label="DyLoRA at rank b")
    ax.axhline(res["base"]["loss"], color="grey", ls="--", label="base model")
    ax.set_xlabel("rank b")
    ax.set_ylabel(f"{res['split']} loss")
    ax.set_xticks(ranks)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
