"""Generated documentation: the config reference (docs/config.md), the README's tables of methods
and objectives, and the model support tables (docs/models.md), all read from the pydantic models,
the registries and the architecture tables.

    python -m tunesmith.docs            print the config reference
    python -m tunesmith.docs --write    rewrite the generated blocks of README.md and docs/config.md
    python -m tunesmith.docs --check    exit 1, naming the files, if a generated block is out of date

A generated block is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, where NAME
is a key of :data:`BLOCKS`; the rest of each file is written by hand. Paths are relative to the
current directory (run it from the repository root).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

#: The files that hold generated blocks, relative to the repository root.
FILES = ("README.md", "docs/config.md", "docs/models.md", "docs/eval.md")


def _type(info) -> str:
    ann = info.annotation
    text = getattr(ann, "__name__", None) if isinstance(ann, type) else None
    text = text or str(ann).replace("typing.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text).replace("|", "\\|")


def _default(info) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return f"`{info.default_factory()!r}`"
    return f"`{info.default!r}`"


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def table(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> str:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        rows.append(f"| `{prefix}{info.alias or name}` | {_type(info)} | {_default(info)} | {_cell(info.description)} |")
    return "\n".join(rows)


def reference() -> str:
    """Every config section's fields, then each registered method's own fields."""
    from .config import OutputConfig, TrainConfig
    from .data import DataConfig
    from .methods import registry
    from .models.loader import ModelConfig
    parts = ["### model", table(ModelConfig, "model."), "### data", table(DataConfig, "data."),
             "### train", table(TrainConfig, "train."), *regularizer_tables(),
             "### output", table(OutputConfig, "output."),
             "### method", "`method.name` picks one of the registered methods; its fields follow."]
    for name, cls in registry.all_methods().items():
        mcfg = cls.Config.model_validate({"name": name})
        lr, head = mcfg.learning_rate(), mcfg.head_learning_rate()
        parts.append(f"#### `{name}` ({cls.family})\n\n{cls.summary} Default `train.lr`: {lr:g}, "
                     f"`train.head_lr`: {head:g} ([defaults.md](defaults.md)).\n")
        if len(cls.Config.model_fields) > 1:
            parts.append(table(cls.Config, "method.", skip=("name",)))
    from .data.mixture_config import MixtureEntry
    parts.insert(4, "#### `data.mixture` entries\n\n" + table(MixtureEntry, "data.mixture[]."))
    parts += _strategies_reference()
    from .train import objectives
    parts.append("### objective\n\n`objective.name` picks one of the registered objectives (`train.objective: NAME` "
                 "is short for `objective: {name: NAME}`); its fields follow.")
    for name, cls in objectives.all_objectives().items():
        parts.append(f"#### `{name}`\n\n{cls.summary}\n")
        if len(cls.Config.model_fields) > 1:
            parts.append(table(cls.Config, "objective.", skip=("name",)))
    return "\n\n".join(parts) + "\n"


def _strategies_reference() -> list[str]:
    from .config import RunConfig
    from .train import strategies
    parts = ["### init_from, strategies", table(RunConfig, "", skip=tuple(k for k in RunConfig.model_fields
                                                                           if k not in ("init_from", "strategies")))]
    for name, cls in strategies.all_configs().items():
        parts += [f"#### strategy `{name}`\n\n{cls.summary}\n", table(cls, "strategies[].", skip=("name",))]
    return parts


def regularizer_tables() -> list[str]:
    """``train.regularize``: each registered regulariser and its fields."""
    from .train import regularizers
    parts = ["#### train.regularize\n\nEach key names a regulariser ([regularization.md](regularization.md)); "
             "its fields follow."]
    for name, cls in regularizers.all_regularizers().items():
        parts.append(f"##### `{name}`\n\n{cls.summary}\n")
        if len(cls.model_fields) > 1:
            parts.append(table(cls, f"train.regularize.{name}.", skip=("name",)))
    return parts


def _result(cls) -> str:
    if cls.artifact == "adapter":
        return f"`adapter/` (peft `{cls.peft_type}`)" if cls.peft_type else "`adapter/` (tunesmith format)"
    return f"`{cls.artifact}/`"


def methods_table() -> str:
    """One row per registered method: name, family, what it does, what a run saves, whether it merges."""
    from .methods import registry
    rows = ["| `method.name` | family | what it does | a run saves | `merge` |", "|---|---|---|---|---|"]
    for name, cls in registry.all_methods().items():
        rows.append(f"| `{name}` | {cls.family} | {_cell(cls.summary)} | {_result(cls)} | "
                    f"{'yes' if cls.mergeable else 'no'} |")
    return "\n".join(rows) + "\n"


def objectives_table() -> str:
    """One row per registered objective: name, the data formats it is the default for, what it trains."""
    from .train import objectives
    rows = ["| `objective.name` | reads `data.format` | default for | model head | what it trains |",
            "|---|---|---|---|---|"]
    for name, cls in objectives.all_objectives().items():
        reads = ", ".join(f"`{f}`" for f in cls.formats) or "–"
        default = ", ".join(f"`{f}`" for f in cls.default_for) or "–"
        default += " (encoder-decoders)" if cls.encoder_decoder and cls.default_for else ""
        head = f"{cls.task} ({cls.num_labels} output)" if cls.num_labels else cls.task
        rows.append(f"| `{name}` | {reads} | {default} | {head} | {_cell(cls.summary)} |")
    return "\n".join(rows) + "\n"


def coverage_options(cls) -> dict:
    """The options the coverage matrix and docs/models.md apply a method with: its first invariant case's."""
    cases = cls.invariant_cases
    return dict(cases[0].get("options", {})) if cases else {}


def coverage_method(cls):
    """An (unapplied) instance of method ``cls`` with :func:`coverage_options`."""
    return cls(cls.Config.model_validate({"name": cls.name, **coverage_options(cls)}))


def support() -> dict[str, dict[str, tuple[str, str | None]]]:
    """family -> method -> ("merge" | "adapter" | "no", reason), asked of each family's weightless
    skeleton (what tests/test_coverage.py checks against the trained tiny models)."""
    from .methods import registry
    from .models.families import FAMILIES
    from .models.loader import skeleton
    out = {}
    for fam in FAMILIES:
        model, row = skeleton(fam), {}
        for name, cls in registry.all_methods().items():
            method = coverage_method(cls)
            reason = method.unsupported(model)
            refusal = method.merge_refusal(model)
            row[name] = ("no", reason) if reason else ("adapter", refusal) if refusal else ("merge", None)
        out[fam] = row
    return out


def _mark(n: int) -> str:
    return "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(c)] for c in str(n))


def support_table() -> str:
    """The method × family table and the target-module table of docs/models.md."""
    from .methods import registry
    from .models.families import FAMILIES
    from .models.targets import ARCHITECTURES
    methods = registry.all_methods()
    notes: dict[str, int] = {}
    rows = ["| family | model type | stands for | " + " | ".join(f"`{m}`" + ("*" if c.requires else "")
                                                             for m, c in methods.items()) + " |",
            "|---|---|---|" + "---|" * len(methods)]
    symbol = {"merge": "✓", "adapter": "✓ₐ", "no": "✗"}
    for fam, cells in support().items():
        f = FAMILIES[fam]
        out = []
        for name, (status, reason) in cells.items():
            mark = _mark(notes.setdefault(reason, len(notes) + 1)) if reason else ""
            out.append(symbol[status] + mark)
        rows.append(f"| `random:{fam}` ({f.kind}) | `{f.model_type}` | {f.covers} | " + " | ".join(out) + " |")
    legend = ["✓ trains, saves and loads (and generates, on decoders and encoder-decoders), and merges into a "
              "plain transformers model; ✓ₐ the same, but it stays an adapter (merge refuses); ✗ not supported "
              "(apply refuses with the reason).", ""]
    legend += [f"{_mark(i)} {text}" for text, i in notes.items()]
    needs = [f"\\* `{n}` needs {c.requires}: without it, apply refuses (the matrix checks that refusal where it is missing, and the whole cell where it is there: bitsandbytes' CPU backend runs it in the test environment)."
             for n, c in methods.items() if c.requires]
    targets = ["| model type | LoRA-family defaults (attention + feed-forward) | (IA)³ rescales (feed-forward "
               "input) | adapters after | experts / router parameters |", "|---|---|---|---|---|"]
    for mt in sorted({FAMILIES[f].model_type for f in FAMILIES}):
        a = ARCHITECTURES[mt]
        ia3 = list(dict.fromkeys(a["keys"] + a["values"] + a["ff_out"]))
        sites = a["attn_out"] + a.get("ffn", a["ff_out"])
        moe = ", ".join(a.get("experts", []) + a.get("router", [])) or "–"
        targets.append(f"| `{mt}` | {', '.join(a['attention'] + a['mlp'])} | {', '.join(ia3)} "
                       f"({', '.join(a['ff_out']) or '–'}) | {', '.join(sites)} | {moe} |")
    return "\n".join(rows + [""] + legend + [""] + needs + ["", "Default targets (module-name suffixes, "
                     "models/targets.py):", ""] + targets) + "\n"


#: Generated blocks by marker name.
BLOCKS: dict[str, Callable[[], str]] = {
    "config-reference": reference,
    "methods": methods_table,
    "objectives": objectives_table,
    "support-table": support_table,
    "eval-metrics": lambda: metrics_table(),
}


def metrics_table() -> str:
    """The evaluation tasks and their metrics, from tunesmith.eval's registries."""
    from .eval import metrics, tasks
    rows = ["| task | reads | metric | values | default | what it is |", "|---|---|---|---|---|---|"]
    for t in tasks.all_tasks().values():
        for m in metrics.for_task(t.name):
            rows.append(f"| `{t.name}` | {', '.join(t.formats)} | `{m.name}` | {', '.join(f'`{k}`' for k in m.keys)} "
                        f"| {'yes' if m.default else 'no'} | {_cell(m.summary)} |")
    return "\n".join(rows) + "\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def blocks_in(text: str) -> list[str]:
    """Names of the generated blocks whose begin marker ``text`` contains."""
    return [name for name in BLOCKS if markers(name)[0] in text]


def fill(text: str, source: str = "text") -> str:
    """``text`` with every generated block it contains replaced by its current content."""
    for name in blocks_in(text):
        begin, end = markers(name)
        head, rest = text.split(begin, 1)
        if end not in rest:
            raise SystemExit(f"{source}: {begin} has no {end} after it")
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{BLOCKS[name]()}{end}{tail}"
    return text


def stale(paths) -> list[Path]:
    """Those of ``paths`` whose generated blocks are out of date."""
    return [Path(p) for p in paths if fill(Path(p).read_text(), str(p)) != Path(p).read_text()]


def write(path: Path) -> bool:
    """Rewrite the generated blocks of ``path``; returns whether anything changed."""
    text = path.read_text()
    if not blocks_in(text):
        raise SystemExit(f"{path}: no generated block ({', '.join(markers(n)[0] for n in BLOCKS)})")
    new = fill(text, str(path))
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print or rewrite tunesmith's generated documentation.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", nargs="*", metavar="FILE",
                   help=f"rewrite the generated blocks of these files (default: {' '.join(FILES)})")
    g.add_argument("--check", nargs="*", metavar="FILE",
                   help="exit 1 if a generated block of these files is out of date (default: the same files)")
    args = p.parse_args(argv)
    if args.write is not None:
        for path in args.write or FILES:
            print(f"{path}: {'updated' if write(Path(path)) else 'up to date'}")
    elif args.check is not None:
        old = stale(args.check or FILES)
        if old:
            raise SystemExit(f"out of date: {', '.join(map(str, old))}; run: python -m tunesmith.docs --write")
    else:
        sys.stdout.write(reference())


if __name__ == "__main__":
    main()
