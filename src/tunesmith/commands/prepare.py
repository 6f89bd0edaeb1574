"""`tunesmith prepare CONFIG [key=value ...]`: tokenize the training data of a config once into `data.cache`
(streaming, several worker processes, resumable after a kill); `tunesmith train` then reads it."""
from __future__ import annotations


def add(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenize a config's training data once into data.cache "
                                              "(streaming, --workers processes, resumable)")
    p.add_argument("config", help="YAML config file (the one `tunesmith train` will run)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.cache=cache")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--shard-rows", type=int, default=2000, help="source rows per shard (default 2000)")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    from .. import config as config_mod
    from ..errors import ConfigError
    cfg = config_mod.load(args.config, args.overrides)
    if args.workers < 1 or args.shard_rows < 1:
        raise ConfigError("prepare: --workers and --shard-rows must be at least 1")
    if not cfg.data.cache:
        raise ConfigError(f"{args.config}: data.cache is not set; name the directory to prepare into, "
                          "e.g. data.cache=cache")
    from ..data.prepare import prepare
    from ..models.loader import load_tokenizer, quiet_progress
    from ..train.runner import objective_config, resolve_objective
    objective = objective_config(cfg, resolve_objective(cfg))
    with quiet_progress(not cfg.train.progress):
        tokenizer = load_tokenizer(cfg.model)
    result = prepare(cfg.data, tokenizer, objective=objective, max_seq_len=cfg.train.max_seq_len,
                     workers=args.workers, shard_rows=args.shard_rows, progress=cfg.train.progress)
    print(result.line() if result.shards_written else f"{result.root}: already prepared "
          f"({result.rows} rows -> {result.examples} examples, {result.tokens} tokens)")
