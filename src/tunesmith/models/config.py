"""ModelConfig: the YAML `model:` section (torch-free; loading lives in models/loader.py)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), defer_build=True)
    name_or_path: str = Field(
        "smollm2-135m", description="HF model directory or hub id, a .gguf file, an embedded name "
                                    "(smollm2-135m, minilm-l6), or random:<family> for tests (llama, gpt2, mixtral, bert, t5, "
                                    "bart, …: docs/models.md).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    attn_implementation: str | None = Field(None, description="transformers attention backend (sdpa, eager, …).")
    random_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Config fields overriding the random:<family> defaults (tests).")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model directory.")
