"""DataConfig: where the data is and how to read it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMATS = ("alpaca", "messages", "sharegpt", "text", "classification", "preference")

# Canonical field names that `field_map` may rename source keys to.
CANONICAL_FIELDS = (
    "instruction", "input", "output", "messages", "conversations", "text", "sentence",
    "text_pair", "label", "prompt", "chosen", "rejected",
)


class DataConfig(BaseModel):
    """Training data: files, format, validation split and error policy."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field(
        description="Training data file (.jsonl, .json, .csv or .parquet). Relative paths "
        "are resolved against the current directory."
    )
    validation: str | None = Field(
        default=None,
        description="Validation data file in the same format; when unset, `val_split` of "
        "train is held out.",
    )
    val_split: float = Field(
        default=0.05, ge=0.0, lt=1.0,
        description="Fraction of train held out for validation when `validation` is unset "
        "(0 disables; at least 1 row when > 0). The split is deterministic for a seed.",
    )
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text", "classification",
                    "preference"] = Field(
        default="auto",
        description="Row format. auto detects it from the first row's keys: messages -> "
        "messages, conversations -> sharegpt, chosen+rejected -> preference, "
        "instruction+output -> alpaca, label+text/sentence -> classification, text -> text.",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Renames source keys to canonical ones before anything else, e.g. "
        "{question: instruction, answer: output}.",
    )
    on_error: Literal["raise", "skip"] = Field(
        default="raise",
        description="raise: the first bad row stops with an error naming file, line and "
        "field. skip: bad rows are dropped and counted in the report.",
    )
    max_rows: int | None = Field(
        default=None, ge=1,
        description="Use only the first N rows of train (for quick runs).",
    )
    packing: bool | None = Field(
        default=None,
        description="Concatenate documents and cut them into max_seq_len blocks. Only for "
        "format text; unset means on for text, off otherwise.",
    )
    system_prompt: str | None = Field(
        default=None,
        description="System message prepended to alpaca/messages/sharegpt conversations "
        "that have none (merged into the first user turn if the chat template has no "
        "system role).",
    )
    label_names: list[str] | None = Field(
        default=None,
        description="Classification label order (label i = label_names[i]). Unset: integer "
        "labels are used as-is (must cover 0..K-1), string labels are sorted.",
    )

    @field_validator("field_map")
    @classmethod
    def _check_field_map(cls, value: dict[str, str]) -> dict[str, str]:
        for src, dst in value.items():
            if dst not in CANONICAL_FIELDS:
                raise ValueError(
                    f"field_map maps {src!r} to {dst!r}; valid targets are "
                    + ", ".join(CANONICAL_FIELDS)
                )
        return value

    @field_validator("label_names")
    @classmethod
    def _check_label_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError(f"label_names needs at least 2 names, got {value!r}")
            dupes = sorted({v for v in value if value.count(v) > 1})
            if dupes:
                raise ValueError(f"label_names has duplicates: {dupes!r}")
        return value

    @model_validator(mode="after")
    def _check_packing(self) -> "DataConfig":
        if self.packing and self.format not in ("auto", "text"):
            raise ValueError(
                f"packing=true needs format text, got format {self.format!r}; "
                "set packing to false or null"
            )
        return self
