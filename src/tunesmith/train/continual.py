"""Starting a run from an earlier one (``init_from``) and building the run's ``strategies``.

``init_from: RUN`` loads the final trainable weights of a completed run trained with the same method:
the tensors of its last checkpoint (what the method trains: the adapter, the delta, or all weights), or
its adapter directory when no checkpoint is left, through the method's own ``load_trainable_state``.
"""
from __future__ import annotations

from pathlib import Path

from ..config import load_yaml
from ..errors import ConfigError
from ..files import read_json
from . import checkpoint, strategies


def _run_dir(cfg) -> Path:
    return Path(cfg.init_from)


def check_init(cfg) -> None:
    """ConfigError, before any weights load, when ``init_from`` is not a completed run of the same method."""
    if not cfg.init_from:
        return
    run = _run_dir(cfg)
    where = f"init_from {cfg.init_from!r}"
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{where}: no config.yaml there; give a tunesmith run directory")
    summary = run / "summary.json"
    status = read_json(summary).get("status") if summary.is_file() else None   # FileError when damaged
    if status != "completed":
        raise ConfigError(f"{where}: the run is not completed (summary.json status {status!r}); "
                          "finish it (tunesmith train --resume) or pick another run")
    saved = load_yaml(run / "config.yaml")   # ConfigError naming the file when it is not YAML
    prev = (saved.get("method") if isinstance(saved, dict) else None) or {}
    prev_name = prev.get("name") if isinstance(prev, dict) else prev
    if prev_name != cfg.method.name:
        raise ConfigError(f"{where}: that run trained method {prev_name!r}, this one {cfg.method.name!r}; "
                          "init_from continues the same method's weights")


def load_init(cfg, method, model) -> None:
    """Load ``init_from``'s final trainable weights into the method-applied ``model``."""
    from ..files import load_safetensors
    run = _run_dir(cfg)
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    if ckpts:
        state = load_safetensors(ckpts[-1] / "trainable.safetensors")
    elif (run / "adapter").is_dir():
        from ..methods import peft_format
        _, state = peft_format.read_adapter(run / "adapter")
    else:
        raise ConfigError(f"init_from {cfg.init_from!r}: neither checkpoints/ nor adapter/ is left to load")
    try:
        method.load_trainable_state(model, state)
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"init_from {cfg.init_from!r}: its weights do not fit this model "
                          f"({str(e).splitlines()[0]}); same model, method options and labels are needed") from None


def build_strategies(cfg, model, method, objective, tokenizer, run, total_steps: int) -> list:
    """The run's strategies, prepared on the model as training starts."""
    ctx = strategies.StrategyContext(
        cfg=cfg, tokenizer=tokenizer, objective=objective, method=method, device=run.device, precision=run.precision,
        pad_id=run.pad_id, total_steps=total_steps, grad_accum=run.train.grad_accum,
        max_seq_len=run.train.max_seq_len, seed=run.train.seed)
    out = []
    for scfg in cfg.strategies:
        s = strategies.get(scfg)
        s.prepare(model, ctx)
        out.append(s)
    return out


def add_strategy_params(optimizer, terms: list, lr: float) -> None:
    for s in terms:
        group = s.param_group(lr)
        if group is not None:
            optimizer.add_param_group(group)


def strategy_state(terms: list) -> dict:
    """Every strategy's checkpointed tensors, keyed ``<index>.<name>.<key>``."""
    return {f"{i}.{s.name}.{k}": v for i, s in enumerate(terms) for k, v in s.state_dict().items()}


def load_strategy_state(terms: list, state: dict) -> None:
    for i, s in enumerate(terms):
        prefix = f"{i}.{s.name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if own:   # a checkpoint written without it starts the strategy afresh
            s.load_state_dict(own)
