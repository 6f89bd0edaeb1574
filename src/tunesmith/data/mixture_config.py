"""One entry of ``data.mixture`` (torch-free): a dataset with its own format, fields, task name and share."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import CANONICAL_FIELDS  # defined before config.py imports this module

#: The fields an entry sets for itself (the other data fields come from the data section).
ENTRY_FIELDS = ("train", "validation", "format", "field_map", "max_rows", "val_split", "label_names", "system_prompt")


class MixtureEntry(BaseModel):
    """A dataset of a mixture. Fields left unset take the value of the data section."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    train: str = Field(description="Training data file of this task (any format data.train reads).")
    validation: str | None = Field(None, description="Validation file of this task; unset: data.val_split of train.")
    task: str | None = Field(None, description="Task name for metrics (tasks/NAME/loss) and plots; unset: the "
                                               "train file's name without extension. Unique in the mixture.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text", "classification", "preference",
                    "kto"] | None = Field(None, description="Row format of this entry (unset: data.format).")
    field_map: dict[str, str] | None = Field(None, description="Key renames of this entry (unset: data.field_map).")
    max_rows: int | None = Field(None, ge=1, description="First N rows of this entry's train file.")
    val_split: float | None = Field(None, ge=0.0, lt=1.0, description="Held-out fraction (unset: data.val_split).")
    label_names: list[str] | None = Field(None, description="Label order of this entry (unset: data.label_names); "
                                                           "classification entries must end with the same labels.")
    system_prompt: str | None = Field(None, description="System prompt of this entry (unset: data.system_prompt).")
    tag: str | None = Field(None, description="Task tag: text put before every prompt of this entry, or used as "
                                              "its system prompt (tag_as).")
    tag_as: Literal["prefix", "system"] = Field(
        "prefix", description="prefix: the tag and a newline start the prompt (the instruction, the first user "
                              "turn, the text to classify, the document); system: the tag is the system prompt.")
    weight: float = Field(1.0, ge=0.0, description="Share with mixing weights (normalised over the entries); 0: the "
                                                   "task is evaluated but never trained on.")
    count: int | None = Field(None, ge=1, description="Exactly this many training examples of the entry per "
                                                      "run (sampled, repeating when more than it has).")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="This fraction of the entry's training "
                                                                    "examples (sampled once per run).")

    @field_validator("field_map")
    @classmethod
    def _fields(cls, value):
        for src, dst in (value or {}).items():
            if dst not in CANONICAL_FIELDS:
                raise ValueError(f"field_map maps {src!r} to {dst!r}; valid targets are " + ", ".join(CANONICAL_FIELDS))
        return value

    @model_validator(mode="after")
    def _shares(self):
        if self.count is not None and self.fraction is not None:
            raise ValueError(f"entry {self.name!r}: set count or fraction, not both")
        if self.weight == 0 and (self.count is not None or self.fraction is not None):
            raise ValueError(f"entry {self.name!r}: weight 0 means evaluated only; it cannot also set count or fraction")
        return self

    @property
    def name(self) -> str:
        return self.task or Path(self.train).stem


def check_mixture(entries: list[MixtureEntry]) -> None:
    """ValueError naming the entry: unique task names, at least one entry trained on."""
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if not e.name or "/" in e.name:
            raise ValueError(f"data.mixture[{i}]: task name {e.name!r} must be non-empty and have no '/'")
        if e.name in seen:
            raise ValueError(f"data.mixture[{i}]: task name {e.name!r} is also data.mixture[{seen[e.name]}]'s; "
                             "give each entry its own task")
        seen[e.name] = i
    if not entries:
        raise ValueError("data.mixture is empty; list at least one dataset")
    if all(e.weight == 0 for e in entries):
        raise ValueError("data.mixture: every entry has weight 0; at least one must be trained on")


def first_source(data) -> tuple[str, str, dict[str, str]]:
    """(train file, format, field_map) of ``data`` (a DataConfig), or of its first mixture entry."""
    if not data.mixture:
        return data.train, data.format, data.field_map
    e = data.mixture[0]
    return e.train, e.format or data.format, data.field_map if e.field_map is None else e.field_map
