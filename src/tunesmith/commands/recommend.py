"""`tunesmith recommend --data FILE --budget 24GiB [--time 1h]`: methods that fit, ranked by pilot runs."""
from __future__ import annotations

from pathlib import Path


def add(subparsers) -> None:
    p = subparsers.add_parser("recommend", help="rank the methods that fit a memory budget by short pilot runs")
    p.add_argument("--data", help="training data file (a validation split of 10%% is held out)")
    p.add_argument("--config", help="a run config to start from instead of --data (its data, model and batch)")
    p.add_argument("--budget", required=True, help="memory a run may use, e.g. 24GiB")
    p.add_argument("--time", help="time for all pilots together, e.g. 1h (each gets an equal share)")
    p.add_argument("--model", help="model.name_or_path (default: the config's, or smollm2-135m)")
    p.add_argument("--methods", default="all", help="candidates: comma-separated or 'all' (default)")
    p.add_argument("--pilot-steps", type=int, default=20, help="optimizer steps of each pilot (default 20)")
    p.add_argument("--device", help="device the budget is for: cpu or cuda (default: this machine's)")
    p.add_argument("--out", default="runs/recommend", help="output directory (pilots are reused)")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    from .. import config as config_mod
    from ..errors import ConfigError
    from ..planning import compare, recommend
    if not (args.data or args.config):
        raise ConfigError("recommend: give --data FILE or --config CONFIG")
    data = config_mod.load_yaml(args.config) if args.config else {
        "method": "lora", "data": {"train": args.data, "val_split": 0.1}, "train": {}}
    data.setdefault("train", {}).update({"max_steps": args.pilot_steps, "progress": False})
    data["train"].pop("epochs", None)
    if args.model:
        data.setdefault("model", {})["name_or_path"] = args.model
    base = config_mod.validate(data, args.config or "recommend")
    report = recommend.recommend(base, compare.parse_methods(args.methods), args.budget, Path(args.out),
                                 device=args.device, time_s=recommend.parse_time(args.time))
    print(recommend.markdown(report))
    print(f"report: {Path(args.out) / 'recommend.md'}")
