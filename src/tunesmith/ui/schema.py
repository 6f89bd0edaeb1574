"""The Train form's source: the run config's JSON schema, and the form's values back into a config.

The page builds every field, default, bound and help text from :func:`schema` (pydantic's
``model_json_schema`` of the config sections and of every registered method's config), and sends
back the fields the user set. :func:`check` turns them into the config dict a YAML file would hold
and validates it with :func:`tunesmith.config.validate`, the CLI's own check: the message for a bad
field is the one ``tunesmith train form.yaml`` prints for that YAML. Imports no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from ..config import OutputConfig, RunConfig, TrainConfig
from ..data.config import DataConfig
from ..errors import ConfigError
from ..methods import registry
from ..models.config import ModelConfig

#: The name validation messages give the form's YAML: `tunesmith train form.yaml` on the YAML the page
#: shows prints the same message.
SOURCE = "form.yaml"
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "output": OutputConfig}
#: Shown first; every other field of a section is under its "all fields" fold (the method's fields
#: are all shown).
MAIN_FIELDS = ["model.name_or_path", "data.train", "data.format", "data.validation", "data.max_rows",
               "train.objective", "train.max_steps", "train.epochs", "train.lr", "train.batch_size",
               "train.grad_accum", "train.max_seq_len", "train.eval_every", "train.save_every", "output.dir"]


def objectives() -> list[dict]:
    """The registered objectives (imports torch: the objective registry holds the losses)."""
    from ..train.objectives import all_objectives
    return [{"name": n, "summary": c.summary, "formats": list(c.formats)} for n, c in all_objectives().items()]


def models() -> dict:
    from ..models.families import FAMILIES
    from ..models.loader import EMBEDDED
    return {"embedded": list(EMBEDDED), "random": [f"random:{n}" for n in FAMILIES]}


def schema(runs_dir: Path) -> dict:
    sections = {name: cls.model_json_schema() for name, cls in SECTIONS.items()}
    methods = {n: {"family": c.family, "summary": c.summary, "schema": c.model_json_schema()}
               for n, c in registry.all_configs().items()}
    return {"sections": sections, "methods": methods, "objectives": objectives(), "models": models(),
            "main_fields": MAIN_FIELDS, "runs_dir": str(runs_dir), "output_dir": str(runs_dir / "run"),
            "source": SOURCE, "run_description": RunConfig.model_fields["method"].description}


def scalar(raw: str) -> Any:
    """A form's text as YAML reads it (numbers, true/false, null, [lists], {maps}); '' is unset."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def to_config(fields: dict[str, str] | None, typed: dict[str, Any] | None = None) -> dict:
    """The config dict of the form: ``fields`` are texts typed in (read as YAML scalars, as command-line
    overrides are), ``typed`` the values of choices (already typed). Empty texts are left out."""
    values = {k: scalar(v) for k, v in (fields or {}).items() if str(v).strip() != ""}
    values.update(typed or {})
    return config_mod.apply_overrides({}, dict(sorted(values.items())))


def dump(data: dict) -> str:
    ordered = {k: data[k] for k in config_mod.SECTIONS if k in data}
    return yaml.safe_dump(ordered, sort_keys=False)


def check(data: dict) -> tuple[RunConfig | None, dict]:
    """(config, answer): the validated config or None, and what the page shows: the YAML and, for a
    bad field, the CLI's message and the field it names."""
    answer = {"yaml": dump(data), "error": None, "field": None}
    try:
        return config_mod.validate(data, SOURCE), answer
    except ConfigError as e:
        msg = str(e)
        answer["error"] = msg
        rest = msg.removeprefix(f"{SOURCE}: ")
        answer["field"] = rest.split(":", 1)[0] if rest != msg else None
        return None, answer
