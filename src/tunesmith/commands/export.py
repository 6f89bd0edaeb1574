"""`tunesmith export RUN_DIR... --for vllm|llama.cpp|peft`: write an adapter the target loads, or say why not.

With ``--for vllm`` several runs of one base can be given: each is exported and one ``vllm serve``
command is printed that serves them all (``--lora-modules NAME=PATH ...``, NAME = the run's directory name)."""
from __future__ import annotations


def add(subparsers) -> None:
    from ..export import TARGETS
    p = subparsers.add_parser(
        "export", help="export a run's adapter for vllm, llama.cpp or peft (refuses with the reason when "
                       "the target cannot load it, and offers merge-then-export)")
    p.add_argument("run_dir", nargs="+", help="run directory (or an adapter directory); several for --for vllm")
    p.add_argument("--for", dest="target", required=True, choices=list(TARGETS), help="the runtime to load it")
    p.add_argument("--out", help="output directory (default: RUN_DIR/export-<target>; one run only)")
    p.add_argument("--rank", type=int, help="DyLoRA runs: the rank to export (a plain LoRA of that rank)")
    p.add_argument("--fold-rslora", action="store_true",
                   help="llama.cpp: write rsLoRA scaling as lora_alpha = alpha·√r (exact) instead of refusing")
    p.set_defaults(fn=_run)


def _run(args) -> None:
    from ..errors import ConfigError
    from ..export import export
    if len(args.run_dir) > 1 and (args.target != "vllm" or args.out):
        raise ConfigError("export: several runs need --for vllm and no --out (each is written to RUN/export-vllm)")
    if len(args.run_dir) == 1:
        result = export(args.run_dir[0], args.target, out=args.out, rank=args.rank, fold_rslora=args.fold_rslora)
        print(f"{args.target} adapter written to {result.out_dir}")
        for note in result.notes:
            print(note)
        return
    print(_several_for_vllm(args))


def _several_for_vllm(args) -> str:
    import json
    from pathlib import Path

    from ..errors import ConfigError
    from ..export import export
    from ..export.rules import vllm_command
    from ..methods import peft_format
    modules, bases, names = [], set(), set()
    for run in args.run_dir:
        result = export(run, "vllm", rank=args.rank)
        cfg = json.loads((result.out_dir / peft_format.CONFIG_NAME).read_text())
        bases.add(cfg.get("base_model_name_or_path") or "BASE_MODEL_DIR")
        path = Path(run).resolve()
        name = path.parent.name if path.name == "adapter" else path.name
        name = name if name not in names else f"{name}-{len(names)}"
        names.add(name)
        modules.append((name, str(result.out_dir.resolve()), int(cfg.get("r") or 8)))
        print(f"vllm adapter written to {result.out_dir}")
    if len(bases) > 1:
        raise ConfigError(f"export: the runs are adapters of different base models ({', '.join(sorted(bases))}); "
                          "one vllm server serves adapters of one base")
    return "serve with: " + vllm_command(bases.pop(), modules)
