"""`tunesmith score RUN --data FILE`: a reward model's score for every row of a JSONL file."""
from __future__ import annotations


def add(subparsers) -> None:
    p = subparsers.add_parser("score", help="score a JSONL file with a reward model (objective rm)")
    p.add_argument("run_dir", help="a run trained with objective: {name: rm}")
    p.add_argument("--data", required=True, help="JSONL rows with prompt and completion, or prompt, chosen "
                                                 "and rejected (then both are scored)")
    p.add_argument("--out", help="where to write the rows with their scores (default: print them)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(fn=_run)


def _run(args) -> None:
    import json
    import sys

    from ..data.readers import read_rows
    from ..errors import ConfigError
    from ..infer.score import score
    rows = read_rows(args.data, None, "--data file")
    keys = [k for k in ("completion", "chosen", "rejected") if k in rows[0].data]
    if "prompt" not in rows[0].data or not keys:
        raise ConfigError(f"{rows[0].loc}: score needs prompt and completion (or chosen and rejected) fields, "
                          f"found {sorted(rows[0].data)}")
    out = [dict(r.data) for r in rows]
    for k in keys:
        for row, s in zip(out, score(args.run_dir, [r["prompt"] for r in out], [r[k] for r in out],
                                     batch_size=args.batch_size)):
            row[f"{k}_score" if k != "completion" else "score"] = s
    text = "".join(json.dumps(r) + "\n" for r in out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"{len(out)} rows scored -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
