"""A training run end to end: config → tokenizer → data → model → method → loop → run directory.

The run directory ends with ``summary.json``: ``status: completed`` with the results, or ``status:
failed`` with the reason (a diverged run keeps its checkpoints from before the trouble and saves no
result). The artifact is written to a staging directory and moved into place only when complete.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from ..config import RunConfig
from ..eval import training as eval_training
from ..data import build_datasets, pad_id_for
from ..data.formats import apply_field_map, detect_format
from ..data.mixture_config import first_source
from ..data.readers import first_readable, read_rows
from ..errors import ConfigError, TrainingDiverged
from ..methods import registry
from ..models.loader import (base_reference, is_encoder_decoder, load_model, load_tokenizer, model_kind, quiet_progress,
                             resolve_device)
from . import (accel, checkpoint, continual, distributed, objectives, per_task, regularizers, sharded_checkpoint, speed,
               tracking)
from .divergence import Divergence, nonfinite_weights
from .loop import Batches, Loop, LoopState, evaluate
from .step import OfflineStep
from .optim import build_optimizer, build_scheduler, check_scheduler
from .report import MetricsLog, format_summary, peak_memory_gib, plot_losses


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict

    def __iter__(self):  # allows `run_dir, metrics = tunesmith.train(...)`
        return iter((self.run_dir, self.metrics))


@dataclass
class RunContext:
    """What an objective's ``prepare`` may read of the run."""
    cfg: RunConfig
    train: object          # the train section with the speed fields resolved
    device: torch.device
    precision: str
    pad_id: int
    run_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_objective(cfg: RunConfig) -> str:
    """The objective's name: the objective section's (or train.objective's), else the data format's default."""
    if cfg.objective is not None:
        return cfg.objective.name
    train_file, fmt, field_map = first_source(cfg.data)
    if fmt == "auto":
        rows = read_rows(train_file, max_rows=100 if cfg.data.on_error == "skip" else 1,
                         on_error=cfg.data.on_error, txt_documents=cfg.data.txt_documents, source=cfg.data.source())
        fmt = detect_format(apply_field_map(first_readable(rows), field_map))
    return objectives.for_format(fmt, encoder_decoder=is_encoder_decoder(cfg.model))


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


def objective_config(cfg: RunConfig, name: str) -> objectives.ObjectiveConfig:
    """The run's objective section for objective ``name`` (its defaults when the config has none)."""
    return cfg.objective if cfg.objective is not None and cfg.objective.name == name else objectives.build_config(name)


def build(cfg: RunConfig, objective_spec):
    """Tokenizer, datasets, model with the method applied: everything a run or an eval needs.
    ``objective_spec``: the objective's name or config."""
    seed_everything(cfg.train.seed)
    if isinstance(objective_spec, str):
        objective_spec = objective_config(cfg, objective_spec)
    objective = objectives.get(objective_spec)
    objective.configure(cfg.train)
    method_cls = registry.get(cfg.method.name)
    device = distributed.init(resolve_device(cfg.model.device))   # torchrun: this process's device
    objective.cfg.check(cfg.train, method_cls, model_kind(cfg.model))   # before any weights load
    continual.check_init(cfg)
    accel.check(cfg.train, objective.cfg, method_cls, device)
    distributed.check(cfg.train, method_cls, objective.cfg)
    with quiet_progress(not cfg.train.progress):
        tokenizer = load_tokenizer(cfg.model)
    train_ds, val_ds, report = build_datasets(cfg.data, tokenizer, max_seq_len=cfg.train.max_seq_len,
                                              objective=objective.cfg, seed=cfg.train.seed)
    if distributed.context().main:
        print(report.line(), file=sys.stderr, flush=True)
    with quiet_progress(not cfg.train.progress):
        model = load_model(cfg.model, task=objective.task, num_labels=objective.num_labels or report.num_labels,
                           vocab_size=len(tokenizer), seed=cfg.train.seed,
                           stage_on_cpu=method_cls.stages_on_cpu and device.type == "cuda")
    if objective.task == "classification":
        model.config.pad_token_id = pad_id_for(tokenizer)
    accel.before_method(model, cfg.train)
    method = method_cls(cfg.method)
    method.device = device
    model = method.apply(model)
    registry.attach(model, method)
    if cfg.init_from:
        continual.load_init(cfg, method, model)   # the earlier run's trained weights, trained on from here
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
    """Train; a run that fails after its directory exists is marked ``status: failed`` there."""
    t_start = time.perf_counter()
    objective_name = resolve_objective(cfg)
    ocfg = objective_config(cfg, objective_name)
    cfg = cfg.model_copy(update={"objective": ocfg, "train": cfg.train.model_copy(update={"objective": objective_name})})
    cfg, lr_source = config_mod.with_method_lr(cfg)
    eval_training.resolve(cfg.train.eval_metrics, objectives.get(ocfg))  # before anything is loaded
    regularizers.check(cfg.train, ocfg)
    tracking.check(cfg.train.report_to)
    check_scheduler(cfg.train)
    built = build(cfg, ocfg)
    # run_dir: set once the run owns a directory (a new one, or a resumed one once training starts)
    progress = {"state": LoopState(), "wall": 0.0, "run_dir": None, "lr_source": lr_source}
    try:
        return _train(cfg, resume, built, t_start, progress)
    except TrainingDiverged as e:
        if progress["run_dir"] is None:
            raise
        _drop_checkpoints_from(progress["run_dir"], (e.first_bad_step or progress["state"].step) - 1)
        message = _diverged_message(str(e), cfg, progress["run_dir"])
        _mark_failed(cfg, message, progress, t_start)
        raise TrainingDiverged(message) from None
    except BaseException as e:
        if progress["run_dir"] is not None:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            _mark_failed(cfg, why, progress, t_start)
        raise


def _train(cfg: RunConfig, resume: Path | None, built, t_start: float, progress: dict) -> RunResult:
    tokenizer, train_ds, val_ds, report, model, method, objective = built
    device = next(model.parameters()).device
    precision = precision_for(cfg, device)
    tc, speed_report = speed.resolve(cfg.train, model, type(method), device, accel.step_tokens(cfg.train, objective),
                                     held=accel.held_bytes(cfg.train, objective, model, device),
                                     loss_chunks=bool(getattr(objective, "chunked", False)))
    run_mode = distributed.mode(tc, method, model, device)
    tc, ctx = distributed.resolved_train(tc, run_mode), distributed.context()
    objective.configure(tc)  # again, with the speed fields resolved (the compiled loss chunk follows train.compile)
    regularizers.apply(tc, model)   # before compile: embedding noise, dropout rates
    accel.after_method(model, tc)
    pad_id = pad_id_for(tokenizer)
    if objective.online:   # rollouts read the rows as they are; one process (refused earlier otherwise)
        batches = Batches(train_ds, tc.batch_size, tc.seed, pad_id, device, packed_tokens=accel.packed_tokens(tc),
                          raw=True)
    else:
        batches = distributed.train_batches(train_ds, tc.batch_size, tc.seed, pad_id, device,
                                            accel.packed_tokens(tc))
    steps_per_epoch = max(1, batches.per_epoch() // tc.grad_accum)
    total_steps = tc.max_steps or max(1, math.ceil((tc.epochs or 1.0) * steps_per_epoch))
    method.on_train_begin(model, total_steps)  # before anything is written: it may refuse the config
    eval_limit = tc.eval_batches
    val_batches = (lambda: Batches(val_ds, tc.batch_size, tc.seed, pad_id, device,
                                         raw=objective.online).iterate(eval_limit)) if val_ds else None
    probe_n = min(eval_limit or 4, 4)
    train_probe = lambda: batches.iterate(probe_n)  # noqa: E731  fixed slice of train, before/after

    run_dir = Path(resume) if resume else distributed.broadcast(new_run_dir(cfg.output.dir) if ctx.main else None)
    progress["run_dir"] = None if resume else run_dir
    if ctx.main:
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
    state = LoopState()
    context = RunContext(cfg=cfg, train=tc, device=device, precision=precision, pad_id=pad_id, run_dir=run_dir)
    objective.prepare(model, method, [train_ds, val_ds], run=context)   # a reference policy, cached log-probs
    if not resume:
        whole = distributed.whole(batches)   # the same batches on every process
        method.prepare(model, (whole.get(i) for i in range(whole.per_epoch())), objective)
    parallel = distributed.parallelize(model, run_mode, precision, device)
    terms = continual.build_strategies(cfg, model, method, objective, tokenizer, context, total_steps)
    if terms and objective.online:
        raise ConfigError(f"strategies: {', '.join(type(t).__name__ for t in terms)} add loss terms to the offline "
                          f"step, and objective.name: {objective.cfg.name} trains online; remove them")
    optimizer = build_optimizer(method, model, tc, device)
    continual.add_strategy_params(optimizer, terms, tc.lr)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    train_step = objective.train_step(batches=batches, tokenizer=tokenizer, run=context) or OfflineStep()
    train_step.bind(model, optimizer, scheduler)
    if resume:
        state, progress["wall"] = _restore(run_dir, method, model, optimizer, scheduler, total_steps, train_step,
                                           run_mode, tc.batch_size * ctx.world, terms)
    progress["state"], progress["run_dir"] = state, run_dir
    metrics = (MetricsLog if ctx.main else distributed.ReadOnlyLog)(run_dir / "metrics.jsonl",
                                                                    resume_step=state.step if resume else None)
    log = tracking.Tracked(metrics, tc.report_to if ctx.main else [], run_dir, cfg.model_dump(mode="json"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    metric_names = eval_training.resolve(tc.eval_metrics, objective)
    metric_kwargs = dict(tokenizer=tokenizer, label_names=report.label_names, limit=eval_limit and eval_limit *
                         tc.batch_size, batch_size=tc.batch_size, precision=precision, device=device)
    extra_metrics = eval_training.TrainingMetrics(metric_names, val_ds=val_ds, **metric_kwargs)
    task_eval = per_task.TaskEval(   # a mixture's validation: every task on its own, and the whole
        val_ds, objective, lambda ds: Batches(ds, tc.batch_size, tc.seed, pad_id, device).iterate(eval_limit),
        metric_names=metric_names, metric_kwargs=metric_kwargs, precision=precision, device=device,
    ) if getattr(val_ds, "tasks", None) else None

    def on_eval(s: LoopState) -> None:
        if task_eval:
            log.write({"step": s.step, "split": "eval", **task_eval(model)})
        elif val_batches:
            records: list = []
            res = evaluate(model, objective, val_batches(), precision, device, records=records)
            if extra_metrics:
                res.update(extra_metrics.compute(model, res, records))
            log.write({"step": s.step, "split": "eval", **res})

    def on_checkpoint(s: LoopState) -> None:
        _check_weights(named, s.step)
        position = {"micro": s.micro, "tokens": s.tokens, "train_time": s.train_time,
                    "wall_time": progress["wall"] + time.perf_counter() - t_start, "step_state": train_step.state_dict()}
        if ctx.joined:
            sharded_checkpoint.save(run_dir / "checkpoints", s.step, method=method, model=model, optimizer=optimizer,
                                    scheduler=scheduler, position=position, keep=tc.keep_checkpoints,
                                    run_mode=run_mode, global_batch=tc.batch_size * ctx.world)
            return
        checkpoint.save(run_dir / "checkpoints", s.step, trainable=method.trainable_state(model),
                        optimizer=optimizer, scheduler=scheduler, keep=tc.keep_checkpoints,
                        position=position, extra=continual.strategy_state(terms))

    before = {}
    if not resume:
        before = {"train": evaluate(model, objective, train_probe(), precision, device)}
        log.write({"step": 0, "split": "train_probe", **before["train"]})
        on_eval(state)
    first = next((r["loss"] for r in log.read() if r["split"] == "train"), None)
    guard = Divergence(uniform=objective.uniform_loss(model), patience=tc.divergence_steps or 1 << 30, start=first,
                       finite_only=objective.online)
    loop = Loop(model=model, method=method, objective=regularizers.training_objective(tc, objective), optimizer=optimizer, scheduler=scheduler,
                batches=batches, cfg=tc, device=device, precision=precision, total_steps=total_steps,
                on_eval=on_eval, on_checkpoint=on_checkpoint, log=log.write, divergence=guard, parallel=parallel,
                train_step=train_step, strategies=terms)
    state = loop.run(state)
    after_train = evaluate(model, objective, train_probe(), precision, device)
    log.write({"step": state.step, "split": "train_probe", **after_train})
    log.close()
    _check_weights(named, state.step)
    per_rank = distributed.gather({"tokens": state.tokens, "peak_memory_gib": peak_memory_gib(device)})
    with distributed.gathered(model):   # fsdp: whole weights, so rank 0 saves what one process saves
        artifact = _save_artifact(method, model, tokenizer, run_dir, base_reference(cfg.model)) if ctx.main else None
    if not ctx.main:
        return RunResult(run_dir, distributed.broadcast(None))
    summary = _finish(cfg, run_dir, model, method, state, log.read(), report, artifact, device, t_start)
    summary.update(time_s=progress["wall"] + summary["session_time_s"], train_probe_batches=probe_n,
                   optimizer_state_bytes=optimizer_state_bytes(optimizer), artifact_bytes=path_bytes(artifact),
                   lr=tc.lr, lr_source=progress["lr_source"],
                   head_lr=tc.head_lr if any(g.get("head") for g in optimizer.param_groups) else None)
    speed_report.measured_peak_gib = loop.first_step_peak_gib
    summary["speed"] = speed_report.as_dict()
    summary["parallel"] = {"mode": run_mode, "processes": ctx.world, "train_tokens": sum(r["tokens"] for r in per_rank),
                           "tokens_per_s": sum(r["tokens"] for r in per_rank) / max(state.train_time, 1e-9),
                           "peak_memory_gib": [r["peak_memory_gib"] for r in per_rank]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if tc.progress:
        print(format_summary(summary), flush=True)
    return RunResult(run_dir, distributed.broadcast(summary))


def _restore(run_dir: Path, method, model, optimizer, scheduler, total_steps: int, train_step,
             run_mode: str = "none", global_batch: int = 0, terms: list = ()) -> tuple[LoopState, float]:
    """The loop state and wall-clock seconds so far, from the newest readable checkpoint of ``run_dir``
    (a sharded one, of a run of several processes, through train/sharded_checkpoint.py)."""
    pos = sharded_checkpoint.restore(run_dir, method=method, model=model, optimizer=optimizer, scheduler=scheduler,
                                     run_mode=run_mode, global_batch=global_batch)
    if pos is None:
        ckpt, data = checkpoint.read_latest(run_dir, say=lambda m: print(m, file=sys.stderr, flush=True))
        pos = checkpoint.load(ckpt, method=method, model=model, optimizer=optimizer, scheduler=scheduler, data=data)
        continual.load_strategy_state(terms, data["strategies"])
    train_step.load_state_dict(pos.get("step_state") or {})
    state = LoopState(step=pos["step"], micro=pos["micro"], tokens=pos["tokens"], train_time=pos["train_time"])
    if state.step >= total_steps:
        print(f"{run_dir}: already trained to step {state.step} of {total_steps}; writing its outputs again",
              file=sys.stderr, flush=True)
    return state, pos.get("wall_time", pos["train_time"])


def _finish(cfg, run_dir, model, method, state, records, report, artifact, device, t_start) -> dict:
    """loss.png (when asked for) and the summary of a completed run."""
    if cfg.output.plot:
        plot_losses(records, run_dir / "loss.png")
    return _summary(cfg, run_dir, model, method, state, records, report, artifact, device, t_start)


def _check_weights(named, step: int) -> None:
    bad = nonfinite_weights((n, distributed.local(p)) for n, p in named)   # fsdp: this process's shards
    bad = [n for found in distributed.gather(bad) for n in found]           # every process stops, or none
    if bad:
        raise TrainingDiverged(f"the trainable weights hold NaN or infinity at step {step} "
                               f"({len(bad)} tensors, e.g. {bad[0]})", step)


def _drop_checkpoints_from(run_dir: Path, step: int) -> None:
    """Remove the checkpoints of steps >= ``step``: their weights led to the bad steps."""
    if not distributed.context().main:
        return
    for ckpt in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        if int(ckpt.name.split("-")[1]) >= step:
            shutil.rmtree(ckpt, ignore_errors=True)


def _save_artifact(method, model, tokenizer, run_dir: Path, base: str) -> Path:
    """method.save into a staging directory, then moved into the run directory whole."""
    staging = run_dir / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    artifact = method.save(model, staging, base)
    if method.artifact == "model":
        tokenizer.save_pretrained(artifact)
    final = run_dir / artifact.relative_to(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(artifact, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def _diverged_message(reason: str, cfg: RunConfig, run_dir: Path) -> str:
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    kept = (f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was saved before it")
    return (f"training diverged: {reason}. Lower train.lr (now {cfg.train.lr:g}) or add train.warmup_steps; "
            f"{kept}, and no adapter or model was saved ({run_dir} is marked failed)")


def _mark_failed(cfg: RunConfig, reason: str, progress: dict, t_start: float) -> None:
    """summary.json with status failed and the reason; no half-written staging or checkpoint left."""
    run_dir = progress["run_dir"]
    if not distributed.context().main:
        return
    shutil.rmtree(run_dir / ".saving", ignore_errors=True)
    for tmp in (run_dir / "checkpoints").glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    state = progress["state"]
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    session = time.perf_counter() - t_start
    summary = {"status": "failed", "reason": reason, "run_dir": str(run_dir), "method": cfg.method.name,
               "steps": state.step, "train_tokens": state.tokens, "last_checkpoint": str(ckpts[-1]) if ckpts else None,
               "time_s": progress["wall"] + session, "session_time_s": session, "train_time_s": state.train_time}
    try:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.output.plot and (run_dir / "metrics.jsonl").is_file():
            plot_losses(MetricsLog(run_dir / "metrics.jsonl").read(), run_dir / "loss.png")
    except OSError:
        pass


def _summary(cfg, run_dir, model, method, state, records, report, artifact, device, t_start) -> dict:
    trainable, total = method.param_counts(model)
    probes = [r for r in records if r["split"] == "train_probe"]
    evals = [r for r in records if r["split"] == "eval"]
    steps = [r["loss"] for r in records if r["split"] == "train"][-10:]
    first_eval = evals[0] if evals and evals[0]["step"] == 0 else {}
    return {
        "status": "completed", "run_dir": str(run_dir), "method": cfg.method.name,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1),
        "steps": state.step, "train_tokens": state.tokens,
        "train_loss_before": probes[0]["loss"] if probes and probes[0]["step"] == 0 else None,
        "train_loss_after": probes[-1]["loss"] if probes else None,
        "last_step_loss": steps[-1] if steps else None, "last_steps_n": len(steps),
        "last_steps_mean_loss": sum(steps) / len(steps) if steps else None,
        "eval_loss_before": first_eval.get("loss"), "eval_loss_after": evals[-1]["loss"] if evals else None,
        "eval_accuracy_before": first_eval.get("accuracy"),
        "eval_accuracy_after": evals[-1].get("accuracy") if evals else None,
        "eval_f1_macro_before": first_eval.get("f1_macro"),
        "eval_f1_macro_after": evals[-1].get("f1_macro") if evals else None,
        "eval_metrics_after": {k: v for k, v in evals[-1].items() if k not in ("step", "split")} if evals else {},
        "data_skipped": report.skipped, "data_skipped_reasons": report.skipped_reasons,
        "data_truncated": report.truncated, "data_report": report.line(),
        "label_names": report.label_names, "train_rows": report.train_rows, "validation_rows": report.validation_rows,
        "session_time_s": time.perf_counter() - t_start, "train_time_s": state.train_time,
        "tokens_per_s": state.tokens / max(state.train_time, 1e-9),
        "peak_memory_gib": peak_memory_gib(device), "device": str(device), "artifact": str(artifact),
    }
