"""`tunesmith export RUN_DIR --for vllm|llama.cpp|peft`: write an adapter the target loads, or say why not."""
from __future__ import annotations


def add(subparsers) -> None:
    from ..export import TARGETS
    p = subparsers.add_parser(
        "export", help="export a run's adapter for vllm, llama.cpp or peft (refuses with the reason when "
                       "the target cannot load it, and offers merge-then-export)")
    p.add_argument("run_dir", help="run directory (or an adapter directory)")
    p.add_argument("--for", dest="target", required=True, choices=list(TARGETS), help="the runtime to load it")
    p.add_argument("--out", help="output directory (default: RUN_DIR/export-<target>)")
    p.add_argument("--rank", type=int, help="DyLoRA runs: the rank to export (a plain LoRA of that rank)")
    p.add_argument("--fold-rslora", action="store_true",
                   help="llama.cpp: write rsLoRA scaling as lora_alpha = alpha·√r (exact) instead of refusing")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    from ..export import export
    result = export(args.run_dir, args.target, out=args.out, rank=args.rank, fold_rslora=args.fold_rslora)
    print(f"{args.target} adapter written to {result.out_dir}")
    for note in result.notes:
        print(note)
