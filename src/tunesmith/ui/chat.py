"""The Chat tab's models: one generation engine per base model, each behind its own copy of the
`tunesmith serve` app (its OpenAI-compatible routes, streaming included), reached at
``/engines/<id>/v1/...``. A run is served on the engine of its base (``add_adapter``: plain LoRA
per row on the shared base, any other method on its own copy), so the base and a run answer side
by side from one engine, their requests batched together.
"""
from __future__ import annotations

import threading
from pathlib import Path

import yaml

from ..errors import ConfigError


class Pool:
    def __init__(self, device: str = "auto", dtype: str = "auto"):
        self.device, self.dtype = device, dtype
        self.engines: dict[str, object] = {}    # id -> Engine
        self.apps: dict[str, object] = {}       # id -> the serve app over it
        self.bases: dict[str, str] = {}         # base model -> id
        self.lock = threading.Lock()

    def _engine(self, base: str):
        """(id, engine) of ``base``, loaded and started on first use."""
        with self.lock:
            if base in self.bases:
                key = self.bases[base]
                return key, self.engines[key]
            from ..serve.app import create_app
            from ..serve.build import build_engine
            from ..serve.settings import Settings
            engine = build_engine(base, name=base, device=self.device, dtype=self.dtype, max_batch=8, fast=False)
            key = str(len(self.engines))
            self.engines[key], self.bases[base] = engine, key
            self.apps[key] = create_app(engine, Settings(max_tokens=1024))
            engine.start()
            return key, engine

    def open(self, base: str | None = None, run_dir: Path | None = None, run_name: str | None = None) -> dict:
        """Serve the base model ``base`` or the run in ``run_dir`` (on its base); where to send requests."""
        if run_dir is not None:
            cfg_path = run_dir / "config.yaml"
            if not cfg_path.is_file():
                raise ConfigError(f"chat: {run_dir} has no config.yaml; is the run finished?")
            if not any((run_dir / a).is_dir() for a in ("adapter", "model", "delta")):
                raise ConfigError(f"chat: {run_dir} has no adapter/, model/ or delta/ yet (the run has not finished)")
            base = (yaml.safe_load(cfg_path.read_text()).get("model") or {}).get("name_or_path", "smollm2-135m")
        if not base:
            raise ConfigError("chat: choose a run or give a base model")
        key, engine = self._engine(base)
        name = base
        if run_dir is not None:
            name = run_name or run_dir.name
            with self.lock:
                if name not in engine.models():
                    engine.add_adapter(name, run_dir)
        return {"engine": key, "model": name, "base": base, "url": f"/engines/{key}/v1/chat/completions"}

    def models(self) -> list[dict]:
        return [{"engine": k, "models": e.models()} for k, e in self.engines.items()]

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.shutdown(timeout=2)
