"""Export a run's adapter for another runtime (vLLM, llama.cpp, peft), or refuse with the reason.

``export(path, target)`` finds the artifact of a run directory (or takes an adapter directory),
checks it against what ``target`` can load (:mod:`tunesmith.export.rules`) and writes a copy
that the target loads. When the target cannot load it, :class:`ExportRefused` names every
reason and offers merge-then-export (``tunesmith merge``), which always works because a merged
model is a plain transformers directory.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, TunesmithError
from ..files import read_json, safetensors_keys
from ..methods import peft_format, registry
from .rules import TARGETS, problems

__all__ = ["ExportRefused", "ExportResult", "export", "TARGETS"]


class ExportRefused(TunesmithError):
    """The target cannot load this artifact as it is; the message says why and what to do instead."""


@dataclass
class ExportResult:
    out_dir: Path
    notes: list[str] = field(default_factory=list)


def _artifact(path: Path) -> Path:
    """The artifact directory of a run directory, or ``path`` itself."""
    if (path / "config.yaml").is_file():
        for name in ("adapter", "model", "delta"):
            if (path / name).is_dir():
                return path / name
        raise ConfigError(f"{path}: a run directory without adapter/, model/ or delta/ (did the run finish?)")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory; give a run directory or an adapter directory")
    return path


def _refuse(src: Path, target: str, reasons: list[str], method: type[registry.Method] | None = None) -> ExportRefused:
    lines = [f"{target} cannot load {src} as it is:"] + [f"  - {r}" for r in reasons]
    if method is not None and not method.mergeable:
        lines += [f"Nor can {method.name} be merged into the weights ({method.unmergeable_reason}). Load the "
                  f"adapter with peft or tunesmith instead: tunesmith export {src} --for peft"]
    else:
        merged = "MERGED_DIR"
        lines += ["Instead, merge the method into the weights and export the plain model:",
                  f"  tunesmith merge {src} {merged}", f"  {TARGETS[target]['merged_hint'].format(merged=merged)}"]
    return ExportRefused("\n".join(lines))


def _tensor_names(adapter: Path) -> list[str]:
    f = adapter / peft_format.WEIGHTS_NAME
    if not f.is_file():
        return []
    return [peft_format.from_peft_key(k) for k in safetensors_keys(f)]


def _read_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _out_dir(src: Path, art: Path, target: str, out: str | Path | None) -> Path:
    base = src if (src / "config.yaml").is_file() else art.parent
    out_dir = Path(out) if out else base / f"export-{target.replace('.', '')}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"export: output directory {out_dir} exists and is not empty; choose another --out")
    return out_dir


def _copy_adapter(art: Path, out_dir: Path, fold_rslora: bool) -> None:
    cfg, state = peft_format.read_adapter(art)
    meta = _read_json(art / peft_format.META_NAME) or {"base": cfg.get("base_model_name_or_path")}
    if fold_rslora and cfg.get("use_rslora"):
        # alpha/√r == (alpha·√r)/r: the same scaling, written the way alpha/r runtimes read it
        cfg = {**cfg, "lora_alpha": cfg["lora_alpha"] * math.sqrt(cfg["r"]), "use_rslora": False}
        if "method" in meta:
            meta["method"] = {**meta["method"], "alpha": cfg["lora_alpha"], "use_rslora": False}
    peft_format.write_adapter(out_dir, cfg, state, meta)


def _method_of(art: Path, peft_cfg: dict | None = None) -> type[registry.Method] | None:
    """The tunesmith method of an adapter (its tunesmith.json, else the method that loads its peft_type)."""
    meta = _read_json(art / peft_format.META_NAME)
    if "method" in meta:
        return registry.get(meta["method"]["name"])
    ptype = (peft_cfg or {}).get("peft_type")
    return next((m for m in registry.all_methods().values() if ptype and m.peft_type == ptype), None)


def export(path: str | Path, target: str, *, out: str | Path | None = None, rank: int | None = None,
           fold_rslora: bool = False) -> ExportResult:
    """Write ``path``'s adapter where ``target`` loads it; raise ExportRefused (with reasons) if it cannot."""
    if target not in TARGETS:
        raise ConfigError(f"export --for: unknown target {target!r}; valid: {', '.join(TARGETS)}")
    src = Path(path)
    art = _artifact(src)
    if (art / "config.json").is_file() and not (art / peft_format.CONFIG_NAME).is_file():
        hint = TARGETS[target]["merged_hint"].format(merged=art)
        raise ExportRefused(f"{art} is already a full transformers model directory; there is no adapter to "
                            f"export. Use it directly: {hint}")
    if not (art / peft_format.CONFIG_NAME).is_file():
        raise _refuse(src, target, [f"the artifact {art} is a tunesmith delta (changed tensors), not an adapter"])
    out_dir = _out_dir(src, art, target, out)
    with tempfile.TemporaryDirectory() as tmp:
        if rank is not None:
            art = _cut_to_rank(art, rank, Path(tmp) / "adapter")
        cfg = _read_json(art / peft_format.CONFIG_NAME)
        reasons = problems(target, cfg, _tensor_names(art), fold_rslora=fold_rslora)
        if reasons:
            raise _refuse(src, target, reasons, _method_of(art, cfg))
        _copy_adapter(art, out_dir, fold_rslora)
    return ExportResult(out_dir, TARGETS[target]["notes"](cfg, out_dir))


def _cut_to_rank(art: Path, rank: int, tmp: Path) -> Path:
    method = _method_of(art)
    cut = getattr(method, "export_rank", None)
    if cut is None:
        raise ConfigError(f"export --rank: only DyLoRA runs can be cut to a rank; {art} was trained "
                          f"with {method.name if method else 'an unknown method'}")
    return cut(art, rank, tmp)
