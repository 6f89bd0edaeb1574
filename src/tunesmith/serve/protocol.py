"""The OpenAI request bodies tunesmith serves (pydantic) and the response objects it returns.

Fields follow the OpenAI API reference for ``/v1/chat/completions`` and ``/v1/completions``.
Sampling extensions that vLLM also takes (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``) are accepted; parameters that would change the answer but are
not implemented (tools, response formats, logit bias, presence/frequency penalties, ``echo`` …)
are refused with a 400 naming them rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..infer.engine import SamplingParams

#: Request fields that would change the answer and are not implemented; sent non-empty they get a 400.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
               "presence_penalty", "frequency_penalty", "echo", "suffix", "best_of", "prediction", "audio",
               "modalities", "reasoning_effort")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A served model: the base, an adapter name or a proxy name (GET /v1/models).")
    max_tokens: int | None = Field(None, description="New tokens at most (default: the server's limit, or what "
                                                     "fits the context).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="Completions per prompt.")
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int = Field(0, ge=0, description="Extension: keep the k most likely tokens (0 = off).")
    min_p: float = Field(0.0, ge=0, le=1, description="Extension: min-p sampling.")
    repetition_penalty: float = Field(1.0, gt=0, description="Extension: CTRL's repetition penalty.")
    ignore_eos: bool = Field(False, description="Extension: do not stop at EOS / end of turn.")
    stop_token_ids: list[int] | None = Field(None, description="Extension: more token ids that end the answer.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if not _harmless(name, value):
                raise ValueError(f"{name}={value!r} is not supported by tunesmith serve")
        return self

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                              stop=tuple(self.stop or ()), stop_token_ids=tuple(self.stop_token_ids or ()),
                              ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs)


def _harmless(name: str, value) -> bool:
    """Whether an unsupported parameter was sent with its no-op value (clients send defaults)."""
    if value is None or value is False or value == [] or value == {}:
        return True
    return ((name in ("presence_penalty", "frequency_penalty") and value == 0) or (name == "best_of" and value == 1)
            or (name == "response_format" and isinstance(value, dict) and value.get("type") == "text")
            or (name == "tool_choice" and value == "none"))


class Part(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None

    def as_turn(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def wanted_tokens(self) -> int | None:
        return self.max_tokens


class ScoreRequest(BaseModel):
    """LLaMA-Factory's ``/v1/score/evaluation``: texts scored by a reward or classification model."""
    model: str
    messages: list[str] = Field(min_length=1)
    max_length: int | None = Field(None, ge=1)


class LoadAdapter(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body: serve the run or adapter at ``lora_path`` as ``lora_name``."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token(tokenizer, tid: int) -> dict:
    text = tokenizer.decode([tid])
    return {"token": text, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, ids: list[int], lps: list[float] | None, tops) -> dict | None:
    """The ``logprobs`` object of a chat choice (``{"content": [...]}``)."""
    if lps is None:
        return None
    content = []
    for i, (tid, lp) in enumerate(zip(ids, lps)):
        alts = (tops[i] if tops else None) or []
        content.append({**_token(tokenizer, tid), "logprob": lp,
                        "top_logprobs": [{**_token(tokenizer, t), "logprob": v} for t, v in alts]})
    return {"content": content}


def completion_logprobs(tokenizer, ids: list[int], lps: list[float] | None, tops, offset: int = 0) -> dict | None:
    """The legacy ``logprobs`` object of a completions choice."""
    if lps is None:
        return None
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = [{tokenizer.decode([t]): v for t, v in (tops[i] if tops else None) or []} for i in range(len(ids))]
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
    obj = {"chat": "chat.completion", "chat.chunk": "chat.completion.chunk", "text": "text_completion",
           "text.chunk": "text_completion"}[kind]
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
