"""A training run end to end: config → tokenizer → data → model → method → loop → run directory."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from ..config import RunConfig
from ..data import build_datasets, pad_id_for
from ..data.formats import apply_field_map, detect_format
from ..data.readers import read_rows
from ..methods import registry
from ..models.loader import base_reference, load_model, load_tokenizer, resolve_device
from . import accel, checkpoint, objectives, speed
from .loop import Batches, Loop, LoopState, evaluate
from .optim import build_optimizer, build_scheduler
from .report import MetricsLog, format_summary, peak_memory_gib, plot_losses


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict

    def __iter__(self):  # allows `run_dir, metrics = tunesmith.train(...)`
        return iter((self.run_dir, self.metrics))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_objective(cfg: RunConfig) -> str:
    if cfg.train.objective != "auto":
        objectives.get(cfg.train.objective)
        return cfg.train.objective
    fmt = cfg.data.format
    if fmt == "auto":
        row = read_rows(cfg.data.train, max_rows=1)[0]
        fmt = detect_format(apply_field_map(row, cfg.data.field_map))
    return objectives.for_format(fmt)


def new_run_dir(base: str) -> Path:
    path = Path(base)
    n = 2
    while path.exists() and any(path.iterdir()):
        path = Path(f"{base}-{n}")
        n += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def precision_for(cfg: RunConfig, device: torch.device) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def build(cfg: RunConfig, objective_name: str):
    """Tokenizer, datasets, model with the method applied: everything a run or an eval needs."""
    seed_everything(cfg.train.seed)
    objective = objectives.get(objective_name)
    objective.configure(cfg.train)
    method_cls = registry.get(cfg.method.name)
    device = resolve_device(cfg.model.device)
    accel.check(cfg.train, objective_name, method_cls, device)
    tokenizer = load_tokenizer(cfg.model)
    train_ds, val_ds, report = build_datasets(cfg.data, tokenizer, max_seq_len=cfg.train.max_seq_len,
                                              objective=objective.data_objective, seed=cfg.train.seed)
    model = load_model(cfg.model, task=objective.task, num_labels=report.num_labels,
                       vocab_size=len(tokenizer), seed=cfg.train.seed,
                       stage_on_cpu=method_cls.stages_on_cpu and device.type == "cuda")
    if objective.task == "classification":
        model.config.pad_token_id = pad_id_for(tokenizer)
    accel.before_method(model, cfg.train)
    method = method_cls(cfg.method)
    method.device = device
    model = method.apply(model)
    registry.attach(model, method)
    if method.upcast_trainable:
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
    return tokenizer, train_ds, val_ds, report, model, method, objective


def count_params(model) -> tuple[int, int]:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state (AdamW: the two moments and the step)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t))


def path_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(cfg: RunConfig, resume: Path | None = None) -> RunResult:
    t_start = time.perf_counter()
    objective_name = resolve_objective(cfg)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": objective_name})})
    tokenizer, train_ds, val_ds, report, model, method, objective = build(cfg, objective_name)
    device = next(model.parameters()).device
    precision = precision_for(cfg, device)
    tokens = accel.packed_tokens(cfg.train) or cfg.train.batch_size * cfg.train.max_seq_len
    tc, speed_report = speed.resolve(cfg.train, model, type(method), device, tokens)
    objective.configure(tc)  # again, with the speed fields resolved (the compiled loss chunk follows train.compile)
    accel.after_method(model, tc)
    pad_id = pad_id_for(tokenizer)
    batches = Batches(train_ds, tc.batch_size, tc.seed, pad_id, device, packed_tokens=accel.packed_tokens(tc))
    steps_per_epoch = max(1, batches.per_epoch() // tc.grad_accum)
    total_steps = tc.max_steps or max(1, math.ceil((tc.epochs or 1.0) * steps_per_epoch))
    method.on_train_begin(model, total_steps)  # before anything is written: it may refuse the config
    eval_limit = tc.eval_batches
    val_batches = (lambda: Batches(val_ds, tc.batch_size, tc.seed, pad_id, device).iterate(eval_limit)) if val_ds else None
    train_probe = lambda: batches.iterate(min(eval_limit or 4, 4))  # noqa: E731  fixed slice of train, before/after

    run_dir = Path(resume) if resume else new_run_dir(cfg.output.dir)
    (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
    state = LoopState()
    if not resume:
        method.prepare(model, (batches.get(i) for i in range(batches.per_epoch())), objective)
    optimizer = build_optimizer(method, model, tc, device)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    if resume:
        ckpt = checkpoint.latest(run_dir)
        pos = checkpoint.load(ckpt, method=method, model=model, optimizer=optimizer, scheduler=scheduler)
        state = LoopState(step=pos["step"], micro=pos["micro"], tokens=pos["tokens"], train_time=pos["train_time"])
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resume else None)

    def on_eval(s: LoopState) -> None:
        if val_batches:
            res = evaluate(model, objective, val_batches(), precision, device)
            log.write({"step": s.step, "split": "eval", **res})

    def on_checkpoint(s: LoopState) -> None:
        checkpoint.save(run_dir / "checkpoints", s.step, trainable=method.trainable_state(model),
                        optimizer=optimizer, scheduler=scheduler, keep=tc.keep_checkpoints,
                        position={"micro": s.micro, "tokens": s.tokens, "train_time": s.train_time})

    before = {}
    if not resume:
        before = {"train": evaluate(model, objective, train_probe(), precision, device)}
        log.write({"step": 0, "split": "train_probe", **before["train"]})
        on_eval(state)
    loop = Loop(model=model, method=method, objective=objective, optimizer=optimizer, scheduler=scheduler,
                batches=batches, cfg=tc, device=device, precision=precision, total_steps=total_steps,
                on_eval=on_eval, on_checkpoint=on_checkpoint, log=log.write)
    state = loop.run(state)
    after_train = evaluate(model, objective, train_probe(), precision, device)
    log.write({"step": state.step, "split": "train_probe", **after_train})
    artifact = method.save(model, run_dir, base_reference(cfg.model))
    if method.artifact == "model":
        tokenizer.save_pretrained(artifact)
    records = log.read()
    if cfg.output.plot:
        plot_losses(records, run_dir / "loss.png")
    summary = _summary(cfg, run_dir, model, method, state, records, report, artifact, device, t_start)
    summary.update(optimizer_state_bytes=optimizer_state_bytes(optimizer), artifact_bytes=path_bytes(artifact))
    speed_report.measured_peak_gib = loop.first_step_peak_gib
    summary["speed"] = speed_report.as_dict()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if tc.progress:
        print(format_summary(summary), flush=True)
    return RunResult(run_dir, summary)


def _summary(cfg, run_dir, model, method, state, records, report, artifact, device, t_start) -> dict:
    trainable, total = method.param_counts(model)
    probes = [r for r in records if r["split"] == "train_probe"]
    evals = [r for r in records if r["split"] == "eval"]
    first_eval = evals[0] if evals and evals[0]["step"] == 0 else {}
    return {
        "run_dir": str(run_dir), "method": cfg.method.name,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1),
        "steps": state.step, "train_tokens": state.tokens,
        "train_loss_before": probes[0]["loss"] if probes and probes[0]["step"] == 0 else None,
        "train_loss_after": probes[-1]["loss"] if probes else None,
        "eval_loss_before": first_eval.get("loss"), "eval_loss_after": evals[-1]["loss"] if evals else None,
        "eval_accuracy_before": first_eval.get("accuracy"),
        "eval_accuracy_after": evals[-1].get("accuracy") if evals else None,
        "data_skipped": report.skipped, "data_skipped_reasons": report.skipped_reasons,
        "label_names": report.label_names, "train_rows": report.train_rows, "validation_rows": report.validation_rows,
        "time_s": time.perf_counter() - t_start, "train_time_s": state.train_time,
        "tokens_per_s": state.tokens / max(state.train_time, 1e-9),
        "peak_memory_gib": peak_memory_gib(device), "device": str(device), "artifact": str(artifact),
    }


def resume_config(run_dir: Path, overrides=None) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise config_mod.ConfigError(f"--resume {run_dir}: no config.yaml there; is it a tunesmith run directory?")
    return config_mod.load(path, overrides)
