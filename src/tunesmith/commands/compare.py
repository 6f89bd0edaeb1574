"""`tunesmith compare CONFIG --methods lora,dora,prefix|all`: the same task trained with each method."""
from __future__ import annotations

from pathlib import Path


def add(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train one config with several methods; table (md, json) and plots")
    p.add_argument("config", help="YAML run config: the data, model, budget and seed every method shares")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=50")
    p.add_argument("--methods", required=True, help="comma-separated methods (see `tunesmith methods`) or 'all'")
    p.add_argument("--out", help="output directory (default: the config's output.dir + '-compare'); "
                                 "completed runs in it are reused")
    p.add_argument("--same-lr", action="store_true",
                   help="train every method at the config's train.lr (default: each method's own default)")
    p.add_argument("--option", action="append", metavar="METHOD.FIELD=VALUE",
                   help="an option of one method, e.g. fishmask.fisher_samples=256 (repeatable)")
    p.add_argument("--timeout", type=float, help="seconds one method may train before its row says it timed out")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    from .. import config as config_mod
    from ..cli import _check
    from ..planning import compare
    base = config_mod.load(args.config, _check(args.overrides))
    methods = compare.parse_methods(args.methods)
    out = Path(args.out or f"{base.output.dir}-compare")
    options = compare.parse_options(args.option, methods)
    rows = compare.compare(base, methods, out, same_lr=args.same_lr, options=options, timeout_s=args.timeout)
    print(compare.markdown(rows))
    print(f"table: {out / 'compare.md'} and {out / 'compare.json'}; plots: {out}/*.png")
