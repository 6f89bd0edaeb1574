"""The Python API: train, load, apply, merge, methods."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as config_mod
from .errors import ConfigError, ModelError
from .methods import delta, peft_format, registry
from .models.loader import ModelConfig, load_model, load_tokenizer

ARTIFACTS = ("adapter", "delta", "model")


def _overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """``train={'lr': 1e-4}``, ``**{'train.lr': 1e-4}`` and ``train__lr=1e-4`` all mean train.lr."""
    out: dict[str, Any] = {}
    for key, value in kw.items():
        key = key.replace("__", ".")
        if key in config_mod.SECTIONS and isinstance(value, dict) and key != "method":
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def train(config_or_path, *, resume: str | Path | None = None, **overrides):
    """Run a fine-tune. Returns ``RunResult(run_dir, metrics)`` (unpackable as a pair)."""
    from .train import runner
    if resume is not None:
        cfg = runner.resume_config(Path(resume), _overrides(overrides))
        return runner.run(cfg, resume=Path(resume))
    cfg = config_mod.load(config_or_path, _overrides(overrides))
    return runner.run(cfg)


def methods() -> list[dict[str, str]]:
    """Registered methods: name, family, summary."""
    return [{"name": n, "family": c.family, "summary": c.summary} for n, c in registry.all_methods().items()]


def apply(model: nn.Module, name: str, **options) -> nn.Module:
    """Apply method ``name`` with ``options`` to a transformers model in place and return it."""
    cls = registry.get(name)
    try:
        cfg = cls.Config.model_validate({"name": name, **options})
    except Exception as e:  # pydantic's ValidationError, reworded with the method's field names
        raise ConfigError(f"tunesmith.apply({name!r}): {e}") from None
    method = cls(cfg)
    model = method.apply(model)
    registry.attach(model, method)
    return model


def _task_from_peft(peft_cfg: dict, state: dict) -> tuple[str, int | None]:
    if peft_cfg.get("task_type") != "SEQ_CLS":
        return "causal_lm", None
    heads = [v for k, v in state.items() if k.split(".")[0] in ("score", "classifier") and k.endswith("weight")]
    return "classification", (heads[-1].shape[0] if heads else 2)


def _method_for_adapter(path: Path, peft_cfg: dict) -> type[registry.Method]:
    meta = path / peft_format.META_NAME
    if meta.is_file():
        return registry.get(json.loads(meta.read_text())["method"]["name"])
    ptype = peft_cfg.get("peft_type")
    for cls in registry.all_methods().values():
        if cls.accepts_peft(peft_cfg):
            return cls
    raise ConfigError(f"{path}: peft_type {ptype!r} is not supported by any tunesmith method")


def _base_config(name: str, device: str, dtype: str) -> ModelConfig:
    return ModelConfig(name_or_path=name, device=device, dtype=dtype)


def load(path: str | Path, *, base: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load ``(model, tokenizer)`` from a run directory, a tunesmith or peft adapter directory, a
    delta directory, a merged/full model directory, or any model name the config accepts.
    ``base`` overrides the base model an adapter or delta names."""
    p = Path(path)
    if (p / "config.yaml").is_file() and any((p / a).is_dir() for a in ARTIFACTS):
        return _load_run(p, device, dtype)
    if (p / peft_format.CONFIG_NAME).is_file():
        peft_cfg, state = peft_format.read_adapter(p)
        cls = _method_for_adapter(p, peft_cfg)
        meta = p / peft_format.META_NAME
        base_name = base or (json.loads(meta.read_text())["base"] if meta.is_file() else peft_cfg["base_model_name_or_path"])
        task, num_labels = _task_from_peft(peft_cfg, state)
        mcfg = _base_config(base_name, device, dtype)
        model = load_model(mcfg, task=task, num_labels=num_labels)
        model = cls.load_artifact(model, p)
        return model.eval(), load_tokenizer(mcfg)
    if (p / delta.CONFIG_NAME).is_file():
        dcfg = delta.read_config(p)
        mcfg = _base_config(base or dcfg["base_model_name_or_path"], device, dtype)
        model = registry.get(dcfg["method"]["name"]).load_artifact(load_model(mcfg), p)
        return model.eval(), load_tokenizer(mcfg)
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"{path}: not a run directory, adapter, delta or model directory "
                         "(expected config.yaml, adapter_config.json, delta_config.json or config.json)")
    mcfg = _base_config(str(path), device, dtype)
    return load_model(mcfg, task=_task_of_model_dir(p)).eval(), load_tokenizer(mcfg)


def _task_of_model_dir(p: Path) -> str:
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
        if any("SequenceClassification" in a for a in archs):
            return "classification"
    return "causal_lm"


def _load_run(run_dir: Path, device: str, dtype: str):
    cfg = config_mod.load(run_dir / "config.yaml")
    mcfg = cfg.model.model_copy(update={"device": device, "dtype": dtype})
    from .train import objectives
    objective = objectives.get(cfg.train.objective) if cfg.train.objective != "auto" else None
    task = objective.task if objective else "causal_lm"
    summary = run_dir / "summary.json"
    labels = json.loads(summary.read_text()).get("label_names") if summary.is_file() else None
    cls = registry.get(cfg.method.name)
    if (run_dir / "model").is_dir():
        model = load_model(_base_config(str(run_dir / "model"), device, dtype), task=task,
                           num_labels=len(labels) if labels else None)
        return model.eval(), load_tokenizer(_base_config(str(run_dir / "model"), device, dtype))
    model = load_model(mcfg, task=task, num_labels=len(labels) if labels else None, seed=cfg.train.seed)
    tokenizer = load_tokenizer(mcfg)
    if task == "classification":
        from .data import pad_id_for
        model.config.pad_token_id = pad_id_for(tokenizer)
    artifact = next(run_dir / a for a in ARTIFACTS if (run_dir / a).is_dir())
    model = cls.load_artifact(model, artifact)
    return model.eval(), tokenizer


def merge(path: str | Path, out_dir: str | Path) -> Path:
    """Load a run/adapter/delta, fold the method into the weights and save a plain transformers model."""
    model, tokenizer = load(path)
    method = registry.attached(model)
    if method is not None:
        model = method.merge(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"merge: output directory {out} exists and is not empty")
    with torch.no_grad():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
