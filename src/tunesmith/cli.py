"""The tunesmith command line: one entry point for every workflow step."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import TunesmithError


def _cmd_train(args) -> None:
    from . import api
    from .train import launch
    if args.nproc is not None and args.nproc > 1 and not launch.inside_torchrun():
        if args.config and not args.resume:
            from . import config as config_mod
            config_mod.load(args.config, _check(args.overrides))  # errors now, not in N processes
        rest = ([args.config] if args.config else []) + args.overrides + (["--resume", args.resume] if args.resume else [])
        code = launch.launch(args.nproc, rest)
        if code:
            sys.exit(code)
        return
    if args.resume:
        overrides = ([args.config] if args.config and "=" in args.config else []) + args.overrides
        api.train(None, resume=args.resume, **dict(o.split("=", 1) for o in _check(overrides)))
        return
    if not args.config:
        raise TunesmithError("train: give a config file (e.g. examples/quickstart.yaml) or --resume RUN_DIR")
    from . import config as config_mod
    from .train import stages
    if stages.is_staged(args.config):   # stages: several runs chained (docs/strategies.md)
        stages.run(args.config, _check(args.overrides))
        return
    cfg = config_mod.load(args.config, _check(args.overrides))  # before torch is imported: errors come at once
    from .train import runner
    runner.run(cfg)


def _check(overrides: list[str]) -> list[str]:
    for o in overrides:
        if "=" not in o:
            raise TunesmithError(f"override {o!r}: expected key.sub=value, e.g. train.lr=1e-4")
    return overrides


def _cmd_methods(args) -> None:
    from . import api
    rows = api.methods()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{w}}  {r['family']:<9}  lr {r['default_lr']:<6g}  head {r['default_head_lr']:<6g}  "
              f"{r['summary']}")


def _cmd_merge(args) -> None:
    from . import api
    out = api.merge(args.run_dir, args.out_dir)
    print(f"merged model written to {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune language models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a fine-tune from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    t.add_argument("--nproc", type=int, metavar="N", help="train on N processes (GPUs) through torchrun "
                                                         "(train.parallel; docs/distributed.md)")
    t.set_defaults(fn=_cmd_train)
    m = sub.add_parser("methods", help="list the registered fine-tuning methods")
    m.set_defaults(fn=_cmd_methods)
    g = sub.add_parser("merge", help="merge a run's adapter into a plain transformers model directory")
    g.add_argument("run_dir")
    g.add_argument("out_dir")
    g.set_defaults(fn=_cmd_merge)
    for mod in _command_modules():
        mod.add(sub)
    return p


def _command_modules():
    import importlib
    import pkgutil
    from . import commands
    return [importlib.import_module(f"{commands.__name__}.{i.name}") for i in pkgutil.iter_modules(commands.__path__)]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported (later)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError and pydantic errors surfacing from user input
        if type(e).__module__.startswith("tunesmith"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
