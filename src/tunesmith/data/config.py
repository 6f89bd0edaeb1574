"""DataConfig: where the data is and how to read it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMATS = ("alpaca", "messages", "sharegpt", "text", "classification", "preference", "kto", "prompt")

# Canonical field names that `field_map` may rename source keys to.
CANONICAL_FIELDS = (
    "instruction", "input", "output", "messages", "conversations", "text", "sentence",
    "text_pair", "label", "prompt", "chosen", "rejected", "completion", "margin",
)


from .mixture_config import MixtureEntry, check_mixture  # noqa: E402


class EDAConfig(BaseModel):
    """EDA augmentation of classification rows (data/augment.py)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    num_aug: int = Field(4, ge=1, le=32, description="Augmented copies of each training row.")
    alpha_sr: float = Field(0.1, ge=0, le=1, description="Synonym replacement: share of the words replaced.")
    alpha_ri: float = Field(0.1, ge=0, le=1, description="Random insertion: synonyms inserted, as a share of the words.")
    alpha_rs: float = Field(0.1, ge=0, le=1, description="Random swap: word pairs swapped, as a share of the words.")
    p_rd: float = Field(0.1, ge=0, lt=1, description="Random deletion: probability of dropping each word.")


class DataConfig(BaseModel):
    """Training data: files, format, validation split and error policy."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    train: str | None = Field(
        default=None,
        description="Training data file (.jsonl, .json, .csv, .parquet or .txt), or a directory of "
        ".txt files (a plain-text corpus for format text). Relative paths are resolved against "
        "the current directory. Required unless `mixture` is set.",
    )
    mixture: list[MixtureEntry] | None = Field(
        default=None,
        description="Several datasets trained together instead of `train` (docs/strategies.md): each "
        "entry has its own train (and validation) file, format, field_map and task name, and optional "
        "tag, weight, count or fraction; the other data fields apply to every entry unless the entry "
        "sets them. Evaluation reports every task and the whole.",
    )
    mixing: Literal["weights", "temperature", "concat"] = Field(
        default="weights",
        description="How mixture entries are mixed (entries with count or fraction take exactly that "
        "many): weights: p_i = weight_i / sum of weights; temperature: p_i proportional to "
        "n_i^(1/temperature) (n_i: the entry's examples); concat: every example of every entry once. "
        "With weights and temperature the run draws sum(n_i) examples, task i getting p_i of them "
        "(sampled without replacement up to n_i, then again), once per run and the same for a seed.",
    )
    temperature: float = Field(
        default=1.0, gt=0.0,
        description="With mixing temperature: T in p_i ~ n_i^(1/T); 1 is proportional to size, larger "
        "T moves towards uniform.",
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
                    "preference", "kto", "prompt"] = Field(
        default="auto",
        description="Row format. auto detects it from the first row's keys: messages -> "
        "messages, conversations -> sharegpt, chosen+rejected -> preference, "
        "prompt+completion+label -> kto (unpaired preferences: label true for a desirable completion), "
        "instruction+output -> alpaca, label+text/sentence -> classification, text -> text, prompt -> prompt "
        "(the prompts of online RL; the row's other fields go to the reward functions).",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Renames source keys to canonical ones before anything else, e.g. "
        "{question: instruction, answer: output}.",
    )
    on_error: Literal["raise", "skip"] = Field(
        default="raise",
        description="raise: the first bad row (unreadable, not UTF-8, a field missing, empty or "
        "of the wrong type) stops with an error naming file, line and field, and so does losing "
        "more than max_drop_fraction of the rows to truncation. skip: bad rows are dropped and "
        "counted in the report.",
    )
    max_drop_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="With on_error raise: the largest fraction of rows that may be dropped because "
        "truncation left them nothing to train on before the run stops (every drop is reported "
        "either way).",
    )
    truncation: Literal["middle", "left", "right"] = Field(
        default="middle",
        description="How a row longer than train.max_seq_len is cut. middle: the response is kept "
        "and the prompt loses its middle (its start, e.g. the instruction, and its end, the text "
        "just before the answer, stay); left: the response is kept and the prompt loses its "
        "start; right: the row's end is cut (the answer may be lost; a row left with nothing to "
        "train on is dropped). Continued pre-training rows are always cut at the end.",
    )
    max_response_share: float = Field(
        default=0.75, gt=0.0, le=1.0,
        description="With truncation middle or left: when prompt and response are both long, the "
        "response keeps at most this share of max_seq_len (cut at its end) and the prompt the "
        "rest; a short prompt leaves all the remaining room to the response.",
    )
    txt_documents: Literal["file", "blank_line"] = Field(
        default="file",
        description=".txt input: one document per file, or one per block of lines between "
        "blank lines.",
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
    cache: str | None = Field(
        default=None,
        description="Directory of prepared data (`tunesmith prepare CONFIG` writes it: tokenized once, "
        "streaming, resumable). When set, training reads the tokenized examples from there and stops with an "
        "error when they are missing or were prepared with another tokenizer or data settings. sft and pt only.",
    )
    hf_split: str = Field(
        default="train",
        description="When data.train is a Hugging Face datasets name or a folder of data files (not a file, and "
        "not a folder of .txt files): the split to train on.",
    )
    hf_validation_split: str | None = Field(
        default=None,
        description="With a datasets source and no data.validation: the split of the same source to "
        "validate on (e.g. validation or test); unset: val_split of the training split is held out.",
    )
    hf_subset: str | None = Field(default=None, description="The datasets configuration (subset) name, if any.")
    hf_streaming: bool = Field(
        default=False,
        description="Read a datasets source row by row (datasets' streaming mode) instead of loading it whole "
        "first; with `tunesmith prepare` a corpus larger than memory is tokenized as it streams.",
    )
    augment: EDAConfig | None = Field(
        default=None,
        description="EDA text augmentation of the training rows for classification (Wei & Zou 2019: synonym "
        "replacement, random insertion, swap and deletion; docs/regularization.md), e.g. {num_aug: 4}. "
        "Validation rows are never augmented.",
    )
    label_names: list[str] | None = Field(
        default=None,
        description="Classification label order (label i = label_names[i]). Unset: integer "
        "labels are used as-is (must cover 0..K-1), string labels are sorted.",
    )

    def source(self, split: str | None = None) -> dict:
        """What data/hub.py needs to read a datasets source (``split``: instead of hf_split)."""
        return {"split": split or self.hf_split, "subset": self.hf_subset, "streaming": self.hf_streaming}

    def validation_source(self) -> tuple[str | None, dict]:
        """(the validation path, its source options): data.validation, or hf_validation_split of data.train."""
        if self.validation is None and self.hf_validation_split:
            return self.train, self.source(self.hf_validation_split)
        return self.validation, self.source()

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
    def _check_sources(self) -> "DataConfig":
        if self.mixture is None and self.train is None:
            raise ValueError("set data.train (a file) or data.mixture (a list of datasets)")
        if self.mixture is not None and self.train is not None:
            raise ValueError("set data.train or data.mixture, not both")
        if self.mixture is not None:
            check_mixture(self.mixture)
            if self.cache:
                raise ValueError("data.cache holds one prepared dataset; a data.mixture is tokenized per entry "
                                 "at the start of the run: unset data.cache")
        return self

    @model_validator(mode="after")
    def _check_packing(self) -> "DataConfig":
        if self.packing and self.format not in ("auto", "text"):
            raise ValueError(
                f"packing=true needs format text, got format {self.format!r}; "
                "set packing to false or null"
            )
        return self
