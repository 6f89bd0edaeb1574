"""`tunesmith eval MODEL_OR_RUN --data FILE`: evaluate a run or model on a data file.

Writes predictions.jsonl, results.json (and confusion_matrix.png for classification) and prints the
metrics. Tasks: lm (loss, perplexity), classification (through the head, or a generated label),
generation (ROUGE, BLEU, exact match, GSM8K final answers; through the engine with the chat
template) and preference (reward accuracy and margin). ``--shots K --shots-from TRAIN_FILE``
evaluates a language model K-shot, with demonstrations drawn from the train file."""
from __future__ import annotations


def add(subparsers) -> None:
    from ..eval import metrics, tasks
    p = subparsers.add_parser("eval", help="evaluate a run or model on a data file (metrics, predictions)",
                              description=__doc__.split("\n", 1)[1].replace("\n", " "))
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="a run directory, adapter, model directory, .gguf or embedded name (smollm2-135m)")
    p.add_argument("--data", required=True, help="evaluation data (.jsonl, .json, .csv, .parquet)")
    p.add_argument("--task", default="auto", help=f"auto (from the data's format), {', '.join(tasks.all_tasks())}")
    p.add_argument("--metrics", help="comma-separated metric names (default: the task's defaults); valid: "
                                     + ", ".join(metrics.all_metrics()))
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass / decoded together (default 8)")
    p.add_argument("--max-samples", type=int, help="evaluate the first N rows only")
    p.add_argument("--max-new-tokens", type=int,
                   help="new tokens per generated answer (default 128; 8 for a generated label)")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="tokens per scored row at most, for loss, classification and preference scoring "
                        "(default 1024); generation prompts are passed whole")
    p.add_argument("--out", help="output directory (default RUN/eval/DATA, or runs/eval/MODEL-DATA; -TASK for a "
                   "--task other than the data's own, -Kshot for --shots K, -M1_M2 for --metrics M1,M2)")
    p.add_argument("--shots", type=int, default=0, help="demonstrations before each query (default 0: zero-shot)")
    p.add_argument("--shots-from", metavar="TRAIN_FILE", help="file the --shots demonstrations are drawn from")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstration draw (default 0)")
    p.add_argument("--label-names", help="comma-separated class names in label order, e.g. negative,positive")
    p.add_argument("--field-map", help="rename data keys, e.g. question=instruction,answer=output")
    p.add_argument("--format", default="auto", help="data format (default: detected from the first row)")
    p.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_run)


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _field_map(value: str | None) -> dict[str, str]:
    from ..errors import ConfigError
    out = {}
    for item in _list(value) or []:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise ConfigError(f"--field-map {value!r}: expected SOURCE=CANONICAL pairs, e.g. question=instruction")
        out[src.strip()] = dst.strip()
    return out


def _run(args) -> None:
    from ..eval.runner import EvalOptions, evaluate, format_table
    opts = EvalOptions(model=args.model, data=args.data, task=args.task, metrics=_list(args.metrics),
                       batch_size=args.batch_size, max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
                       max_seq_len=args.max_seq_len, out=args.out, shots=args.shots, shots_from=args.shots_from,
                       seed=args.seed, label_names=_list(args.label_names), field_map=_field_map(args.field_map),
                       format=args.format, system_prompt=args.system, device=args.device, dtype=args.dtype,
                       progress=not args.no_progress)
    print(format_table(evaluate(opts)))
