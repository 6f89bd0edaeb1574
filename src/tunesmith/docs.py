"""The config reference, generated from the pydantic models and the method registry.

``python -m tunesmith.docs`` prints it; ``python -m tunesmith.docs --write README.md`` replaces the
text between the reference markers in the README.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import BaseModel

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


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


def table(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> str:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type(info)} | {_default(info)} | {desc} |")
    return "\n".join(rows)


def reference() -> str:
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


def write(readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{reference()}{END}{tail}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", metavar="README", help="replace the reference between the markers in this file")
    args = p.parse_args(argv)
    if args.write:
        write(Path(args.write))
    else:
        sys.stdout.write(reference())


if __name__ == "__main__":
    main()
