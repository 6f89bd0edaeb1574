"""`tunesmith estimate CONFIG`: peak memory and trainable parameters of a run, before any weights load."""
from __future__ import annotations

import json


def add(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="predict a run's peak memory (by component) and trainable "
                                               "parameters from the model's config alone")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.batch_size=8")
    p.add_argument("--device", help="cpu or cuda (default: the config's model.device; auto = this machine)")
    p.add_argument("--num-labels", type=int, default=2, help="classes of a classification head (default 2)")
    p.add_argument("--target-len", type=int, help="an encoder-decoder's target tokens (default train.max_seq_len)")
    p.add_argument("--budget", help="memory to compare the peak with, e.g. 24GiB or 80GB")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    from .. import config as config_mod
    from ..cli import _check
    cfg = config_mod.load(args.config, _check(args.overrides))   # before torch is imported: errors come at once
    from ..planning import estimate as est_mod
    est = est_mod.estimate(cfg, device=args.device, num_labels=args.num_labels, target_len=args.target_len)
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(est_mod.format_estimate(est))
    if args.budget:
        ok = est_mod.fits(est, args.budget)
        print(f"budget       {args.budget}: {'fits' if ok else 'does not fit (out of memory)'}")
