"""``stages:``: several runs chained in one config, each starting from the one before (``init_from``).

A staged config is a run config plus ``stages:``, a list of overrides, each with a ``name``: stage i is
the config with stage i's sections merged in (mappings merged key by key, anything else replaced), its
run directory ``OUTPUT/NAME``, and from the second stage on ``init_from`` the stage before. On top:

- ``replay: {fraction: f}`` or ``{count: n}``: that share of every earlier stage's training examples is
  mixed into the stage's own (``data.mixture`` entries with ``fraction`` / ``count``);
- an ``ewc`` strategy without ``data`` gets the stage before's data section;
- when every stage trains the same objective, each stage also evaluates every other stage's task
  (mixture entries of weight 0), and the run writes the forgetting matrix (task × stage) of the tasks'
  final metric (accuracy, else loss) as ``forgetting.md``, ``forgetting.json`` and ``forgetting.png``,
  with the average forgetting of :func:`average_forgetting`.

Every stage's config is validated before the first one trains. A stage whose run directory already
holds a completed run of the same config (wherever its stage before lived) is not trained again, and one
stopped with a checkpoint is resumed from it, so a staged run stopped half-way is finished by the same
command.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from ..data.mixture_config import ENTRY_FIELDS
from ..errors import ConfigError

STAGE_KEYS = ("name", "replay") + tuple(s for s in config_mod.SECTIONS if s != "init_from")


def is_staged(path_or_dict) -> bool:
    data = config_mod.load_yaml(path_or_dict) if isinstance(path_or_dict, (str, Path)) else path_or_dict
    return isinstance(data, dict) and "stages" in data


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _stage_dicts(data: dict, source: str) -> list[tuple[str, dict, dict]]:
    """(name, merged config dict without init_from, the stage's replay) for each stage."""
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{source}: stages: expected a list of stages, each with a name")
    base = {k: v for k, v in data.items() if k != "stages"}
    out, names = [], set()
    for i, st in enumerate(stages):
        where = f"{source}: stages[{i}]"
        if not isinstance(st, dict) or not isinstance(st.get("name"), str) or not st["name"] or "/" in st["name"]:
            raise ConfigError(f"{where}: each stage needs a name (a non-empty string without '/')")
        if st["name"] in names:
            raise ConfigError(f"{where}: stage name {st['name']!r} is used twice")
        names.add(st["name"])
        bad = [k for k in st if k not in STAGE_KEYS]
        if bad:
            raise ConfigError(f"{where} ({st['name']}): unknown key {bad[0]!r}; valid: {', '.join(STAGE_KEYS)}")
        merged = merge(base, {k: v for k, v in st.items() if k not in ("name", "replay")})
        data_sec = merged.get("data") or {}
        if "mixture" in data_sec:
            raise ConfigError(f"{where} ({st['name']}): a stage trains one dataset (data.train); "
                              "replay mixes in the earlier stages'")
        replay = st.get("replay") or {}
        if replay and (not isinstance(replay, dict) or set(replay) - {"fraction", "count"} or len(replay) != 1):
            raise ConfigError(f"{where} ({st['name']}): replay: expected {{fraction: F}} or {{count: N}}, got {replay!r}")
        out.append((st["name"], merged, replay))
    return out


def _entry(name: str, data: dict, **share) -> dict:
    return {"task": name, **{k: data[k] for k in ENTRY_FIELDS if k in data}, **share}


def _stage_data(i: int, stages: list, cross: bool) -> dict:
    """Stage i's data section: its own task, replayed earlier tasks, the others evaluated only."""
    name, merged, replay = stages[i]
    own = merged["data"]
    entries = [_entry(name, own)]
    for j, (other, m, _) in enumerate(stages):
        if j == i:
            continue
        if j < i and replay:
            entries.append(_entry(other, m["data"], **replay))
        elif cross:
            entries.append(_entry(other, m["data"], weight=0))
    if len(entries) == 1:
        return own
    rest = {k: v for k, v in own.items() if k not in ENTRY_FIELDS}
    return {**rest, "mixture": entries, "mixing": "concat"}


def _with_ewc_data(merged: dict, previous: dict | None) -> dict:
    strategies = []
    for s in merged.get("strategies") or []:
        if isinstance(s, dict) and s.get("name") == "ewc" and s.get("data") is None and previous is not None:
            s = {**s, "data": previous}
        strategies.append(s)
    return {**merged, "strategies": strategies} if strategies else merged


def configs(data: dict, source: str = "config", overrides=None) -> tuple[list, Path, bool]:
    """(the validated RunConfig of every stage, the output root, whether tasks are cross-evaluated)."""
    if overrides:
        data = config_mod.apply_overrides(data, overrides)
    stages = _stage_dicts(data, source)
    given = config_mod.given_overrides(overrides)   # their errors are blamed on them, not on the file
    first = [config_mod.validate(m, f"{source} stages[{i}] ({n})", given) for i, (n, m, _) in enumerate(stages)]
    from .runner import resolve_objective   # torch: only once every stage's own sections are valid
    cross = len({resolve_objective(c) for c in first}) == 1 and len(stages) > 1
    root = Path((data.get("output") or {}).get("dir", "runs/run"))
    out = []
    for i, (name, merged, _) in enumerate(stages):
        d = {**merged, "data": _stage_data(i, stages, cross),
             "output": {**(merged.get("output") or {}), "dir": str(root / name)}}
        d = _with_ewc_data(d, stages[i - 1][1]["data"] if i else None)
        out.append(config_mod.validate(d, f"{source} stages[{i}] ({name})", given))
    return out, root, cross


def _comparable(d: dict) -> dict:
    return {**d, "output": {**(d.get("output") or {}), "dir": None}, "init_from": None}


def matching(cfg) -> dict | None:
    """The summary of the run in stage ``cfg``'s directory when it was started with the same config (apart
    from where it and the stage before live; ``{}`` when it has no summary yet); None otherwise."""
    run_dir = Path(cfg.output.dir)
    try:
        saved = config_mod.validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, ValueError, ConfigError):
        return None
    mine = config_mod.with_method_lr(cfg)[0].model_dump(mode="json")
    theirs = saved.model_dump(mode="json")
    for d in (mine, theirs):   # the objective section is filled in by the run
        d.pop("objective", None)
        d["train"].pop("objective", None)
    if _comparable(mine) != _comparable(theirs):
        return None
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_stage(name: str, cfg):
    """A completed stage is taken as it is, a stopped one resumed from its last checkpoint, else trained."""
    from . import checkpoint, runner
    run_dir = Path(cfg.output.dir)
    summary = matching(cfg)
    if summary is not None and summary.get("status") == "completed":
        print(f"stage {name}: {run_dir} already holds this stage, completed; not trained again",
              file=sys.stderr, flush=True)
        return runner.RunResult(run_dir, summary)
    if summary is not None and checkpoint.list_checkpoints(run_dir / "checkpoints"):
        print(f"stage {name}: resuming {run_dir} from its last checkpoint", file=sys.stderr, flush=True)
        return runner.run(cfg, resume=run_dir)
    return runner.run(cfg)


def run(data_or_path, overrides=None) -> list:
    """Train every stage in order; returns their RunResults (and writes the forgetting matrix)."""
    source = str(data_or_path) if isinstance(data_or_path, (str, Path)) else "config"
    data = config_mod.load_yaml(data_or_path) if isinstance(data_or_path, (str, Path)) else data_or_path
    cfgs, root, cross = configs(data, source, overrides)
    names = [s["name"] for s in data["stages"]]
    results, prev = [], None
    for name, cfg in zip(names, cfgs):
        if prev is not None:
            cfg = cfg.model_copy(update={"init_from": str(prev)})
        result = _run_stage(name, cfg)
        results.append(result)
        prev = result.run_dir
    record = {"stages": [{"name": n, "run_dir": str(r.run_dir)} for n, r in zip(names, results)]}
    if cross:
        from .forgetting import write_matrix
        record["forgetting"] = write_matrix(names, [r.run_dir for r in results], root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "stages.json").write_text(json.dumps(record, indent=2))
    return results

