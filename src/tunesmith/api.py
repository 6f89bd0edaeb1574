"""The Python API: train, load, apply, merge, methods.

torch, transformers and the method implementations are imported inside the functions that use
them, so importing tunesmith (and validating a config) stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from .errors import ConfigError, FileError, ModelError
from .methods import registry
from .models.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

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
    """Run a fine-tune. Returns ``RunResult(run_dir, metrics)`` (unpackable as a pair). The config is
    validated before torch is imported."""
    from .train import stages
    if resume is None and not isinstance(config_or_path, config_mod.RunConfig) and stages.is_staged(config_or_path):
        return stages.run(config_or_path, _overrides(overrides))   # one RunResult per stage
    if resume is not None:
        cfg = config_mod.load_run(Path(resume), _overrides(overrides))
        from .train import checkpoint
        checkpoint.complete(Path(resume))   # before the model loads: a run with nothing to resume from says so now
    else:
        cfg = config_mod.load(config_or_path, _overrides(overrides))
    from .train import runner
    return runner.run(cfg, resume=Path(resume) if resume is not None else None)


def methods() -> list[dict[str, str]]:
    """Registered methods: name, family, summary, default learning rate and task-head rate."""
    rows = []
    for n, c in registry.all_configs().items():
        cfg = c.model_validate({"name": n})
        rows.append({"name": n, "family": c.family, "summary": c.summary, "default_lr": cfg.learning_rate(),
                     "default_head_lr": cfg.head_learning_rate()})
    return rows


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
    if peft_cfg.get("task_type") == "SEQ_2_SEQ_LM":
        return "seq2seq", None
    if peft_cfg.get("task_type") != "SEQ_CLS":
        return "causal_lm", None
    heads = [v for k, v in state.items() if k.split(".")[0] in ("score", "classifier") and k.endswith("weight")]
    return "classification", (heads[-1].shape[0] if heads else 2)


def _method_for_adapter(path: Path, peft_cfg: dict, meta: dict | None = None) -> type[registry.Method]:
    from .methods import peft_format
    meta = meta if meta is not None else peft_format.read_meta(path)
    if meta is not None:
        return registry.get(meta["method"]["name"])
    ptype = peft_cfg.get("peft_type")
    for cls in registry.all_methods().values():
        if cls.accepts_peft(peft_cfg):
            return cls
    raise ConfigError(f"{path}: peft_type {ptype!r} is not supported by any tunesmith method")


def _base_config(name: str, device: str, dtype: str) -> ModelConfig:
    from .models.loader import stored_base
    return ModelConfig(name_or_path=stored_base(name), device=device, dtype=dtype)


def _adapter_base(path: Path, peft_cfg: dict, meta: dict | None) -> str:
    """The base an adapter names: tunesmith.json's ``base``, else adapter_config.json's
    ``base_model_name_or_path`` (one error naming the file when that is missing)."""
    from .methods import peft_format
    if meta is not None:
        return meta["base"]
    return _named_base(path / peft_format.CONFIG_NAME, peft_cfg)


def _named_base(file: Path, cfg: dict) -> str:
    name = cfg.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        found = "missing" if name is None else f"{name!r}, not a model name or path"
        raise FileError(f"{file}: field 'base_model_name_or_path' is {found}; it should name the base model "
                        "it was trained on (or pass base=... to tunesmith.load)")
    return name


def load(path: str | Path, *, base: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load ``(model, tokenizer)`` from a run directory, a tunesmith or peft adapter directory, a
    delta directory, a merged/full model directory, or any model name the config accepts.
    ``base`` overrides the base model an adapter or delta names. A damaged or incomplete file
    raises one FileError naming it."""
    from .methods import delta, peft_format
    from .models.loader import is_encoder_decoder, load_model, load_tokenizer
    p = Path(path)
    if (p / "config.yaml").is_file() and any((p / a).is_dir() for a in ARTIFACTS):
        return _load_run(p, device, dtype)
    if (p / peft_format.CONFIG_NAME).is_file():
        peft_cfg, state = peft_format.read_adapter(p)
        meta = peft_format.read_meta(p)
        cls = _method_for_adapter(p, peft_cfg, meta)
        task, num_labels = _task_from_peft(peft_cfg, state)
        mcfg = _base_config(base or _adapter_base(p, peft_cfg, meta), device, dtype)
        model = load_model(mcfg, task=task, num_labels=num_labels)
        model = cls.load_artifact(model, p)
        return model.eval(), load_tokenizer(mcfg)
    if (p / delta.CONFIG_NAME).is_file():
        dcfg = delta.read_config(p)
        method = dcfg.get("method") if isinstance(dcfg.get("method"), dict) else {}
        if not isinstance(method.get("name"), str):
            raise FileError(f"{p / delta.CONFIG_NAME}: field 'method' should be the method's config with its "
                            f"'name', found {dcfg.get('method')!r}; the file is damaged")
        mcfg = _base_config(base or _named_base(p / delta.CONFIG_NAME, dcfg), device, dtype)
        task = "seq2seq" if is_encoder_decoder(mcfg) else "causal_lm"
        model = registry.get(method["name"]).load_artifact(load_model(mcfg, task=task), p)
        return model.eval(), load_tokenizer(mcfg)
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"{path}: not a run directory, adapter, delta or model directory "
                         "(expected config.yaml, adapter_config.json, delta_config.json or config.json)")
    mcfg = _base_config(str(path), device, dtype)
    task = _task_of_model_dir(p)
    return load_model(mcfg, task=task, num_labels=_labels_of_model_dir(p) if task == "classification" else None
                      ).eval(), load_tokenizer(mcfg)


def _labels_of_model_dir(p: Path) -> int | None:
    """A classifier directory's number of labels (its config.json's id2label), None when it says none."""
    from .files import read_json
    if not (p / "config.json").is_file():
        return None
    config = read_json(p / "config.json")
    return len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels")


def _task_of_model_dir(p: Path) -> str:
    from .files import read_json
    from .models.loader import is_encoder_decoder
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        config = read_json(cfg_file)
        archs = config.get("architectures") or []
        if any("SequenceClassification" in a for a in archs):
            return "classification"
        if config.get("is_encoder_decoder"):
            return "seq2seq"
    elif not p.exists() and is_encoder_decoder(ModelConfig(name_or_path=str(p))):
        return "seq2seq"  # random:<family>, an embedded name or a hub id
    return "causal_lm"


def _load_run(run_dir: Path, device: str, dtype: str):
    from .files import read_json
    from .models.loader import load_model, load_tokenizer
    from .train import objectives
    cfg = config_mod.load(run_dir / "config.yaml")
    mcfg = cfg.model.model_copy(update={"device": device, "dtype": dtype})
    objective = objectives.config_class(cfg.objective.name) if cfg.objective is not None else None
    task = objective.task if objective else "causal_lm"
    summary = run_dir / "summary.json"
    labels = read_json(summary).get("label_names") if summary.is_file() else None
    fixed = objective.num_labels if objective is not None else None
    cls = registry.get(cfg.method.name)
    artifact = next(run_dir / a for a in ARTIFACTS if (run_dir / a).is_dir())
    _check_files(artifact)   # a damaged file is named before the base model's weights load
    if (run_dir / "model").is_dir():
        model = load_model(_base_config(str(run_dir / "model"), device, dtype), task=task,
                           num_labels=fixed or (len(labels) if labels else None))
        return model.eval(), load_tokenizer(_base_config(str(run_dir / "model"), device, dtype))
    model = load_model(mcfg, task=task, num_labels=fixed or (len(labels) if labels else None), seed=cfg.train.seed)
    tokenizer = load_tokenizer(mcfg)
    if task == "classification":
        from .data import pad_id_for
        model.config.pad_token_id = pad_id_for(tokenizer)
    model = cls.load_artifact(model, artifact)
    return model.eval(), tokenizer


def _check_files(artifact: Path) -> None:
    """FileError for an artifact's JSON file that does not parse or safetensors file whose header does not."""
    from .files import read_json, safetensors_keys
    for f in sorted(artifact.glob("*.json")):
        read_json(f)
    for f in sorted(artifact.glob("*.safetensors")):
        safetensors_keys(f)


def merge(path: str | Path, out_dir: str | Path) -> Path:
    """Load a run/adapter/delta, fold the method into the weights and save a plain transformers model."""
    model, tokenizer = load(path)
    method = registry.attached(model)
    if method is not None:
        model = method.merge(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"merge: output directory {out} exists and is not empty")
    import torch
    with torch.no_grad():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
