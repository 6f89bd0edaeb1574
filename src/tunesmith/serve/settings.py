"""Limits and behaviour of one server (the ``tunesmith serve`` flags); importable without FastAPI."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    api_key: str | None = None          #: required as 'Authorization: Bearer KEY' on /v1 (None: open)
    max_body_bytes: int = 1 << 20       #: larger request bodies get a 413
    max_tokens: int = 2048              #: a request may ask for at most this many new tokens
    max_n: int = 8                      #: completions per prompt at most
    request_timeout: float = 600.0      #: seconds before a request is cancelled with a 504
    shutdown_timeout: float = 30.0      #: on shutdown, seconds given to requests in flight
    allow_adapter_loading: bool = False  #: POST /v1/load_lora_adapter and /v1/unload_lora_adapter answer
