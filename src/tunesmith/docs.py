"""Generated documentation: the config reference (docs/config.md) and the README's tables of methods
and objectives, all read from the pydantic models and the registries.

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
FILES = ("README.md", "docs/config.md")


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
        rows.append(f"| `{prefix}{name}` | {_type(info)} | {_default(info)} | {_cell(info.description)} |")
    return "\n".join(rows)


def reference() -> str:
    """Every config section's fields, then each registered method's own fields."""
    from .config import OutputConfig, TrainConfig
    from .data import DataConfig
    from .methods import registry
    from .models.loader import ModelConfig
    parts = ["### model", table(ModelConfig, "model."), "### data", table(DataConfig, "data."),
             "### train", table(TrainConfig, "train."), "### output", table(OutputConfig, "output."),
             "### method", "`method.name` picks one of the registered methods; its fields follow."]
    for name, cls in registry.all_methods().items():
        parts.append(f"#### `{name}` ({cls.family})\n\n{cls.summary}\n")
        if len(cls.Config.model_fields) > 1:
            parts.append(table(cls.Config, "method.", skip=("name",)))
    return "\n\n".join(parts) + "\n"


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
    rows = ["| `train.objective` | default for `data.format` | model head | what it trains |", "|---|---|---|---|"]
    for name, cls in objectives.all_objectives().items():
        formats = ", ".join(f"`{f}`" for f in cls.formats) or "–"
        rows.append(f"| `{name}` | {formats} | {cls.task} | {_cell(cls.summary)} |")
    return "\n".join(rows) + "\n"


#: Generated blocks by marker name.
BLOCKS: dict[str, Callable[[], str]] = {
    "config-reference": reference,
    "methods": methods_table,
    "objectives": objectives_table,
}


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
