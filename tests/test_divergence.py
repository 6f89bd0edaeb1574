"""Runs that go bad stop with one clear message, keep their last good checkpoint, save no result and
are marked failed; good runs are marked completed."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

import tunesmith
from helpers import run_config
from tunesmith import cli
from tunesmith.errors import TrainingDiverged
from tunesmith.train.divergence import Divergence, nonfinite_weights

U = math.log(49152)  # SmolLM2's vocabulary: the uniform-guess loss of the issue's lr=1e4 run


def feed(guard: Divergence, losses, grads=None):
    """The first step at which ``guard`` says stop, and why (None, None when it never does)."""
    for step, loss in enumerate(losses, start=1):
        reason = guard.observe(step, loss, None if grads is None else grads[step - 1])
        if reason:
            return step, reason
    return None, None


def test_a_loss_stuck_at_the_uniform_guess_stops_after_patience_steps():
    step, reason = feed(Divergence(uniform=U, patience=3), [1.9, 1.5, 10.8027, 10.8027, 10.8027, 10.8027])
    assert step == 5 and reason.startswith("the loss sat at 10.8027, the level of a uniform guess (ln 49,152")
    assert reason.endswith("after starting at 1.9000 for 3 steps in a row (steps 3-5)")


def test_a_run_that_starts_at_the_uniform_level_is_not_flagged_for_staying_there():
    assert feed(Divergence(uniform=U, patience=3), [10.9, 10.85, 10.8, 10.79, 10.8, 10.78]) == (None, None)


def test_far_above_start_and_zero_gradients_and_recovery():
    step, reason = feed(Divergence(uniform=None, patience=2), [2.0, 2.5, 6.0, 7.0])
    assert step == 4 and "the loss rose to 7.0000, far above its start (2.0000)" in reason
    step, reason = feed(Divergence(uniform=None, patience=3), [2.0, 1.9, 1.9, 1.9], grads=[1.0, 0.0, 0.0, 0.0])
    assert step == 4 and reason.startswith("the gradients were all zero") and "(steps 2-4)" in reason
    guard = Divergence(uniform=None, patience=3)
    assert feed(guard, [2.0, 6.0, 6.0, 1.8, 6.0, 6.0]) == (None, None)   # a recovery resets the streak
    assert guard.suspect and guard.first_bad == 5


def test_a_streak_on_the_last_step_stops_the_run():
    guard = Divergence(uniform=None, patience=5)
    assert guard.observe(1, 2.0, 1.0) is None and guard.observe(2, 2.1, 1.0, final=True) is None
    guard = Divergence(uniform=None, patience=5)
    assert guard.observe(1, 2.0, 1.0) is None
    assert guard.observe(2, 7.0, 1.0, final=True) == ("the loss rose to 7.0000, far above its start (2.0000) "
                                                      "at the end of the run (steps 2-2)")


def test_nonfinite_loss_or_gradient_stops_at_once():
    assert feed(Divergence(uniform=U), [2.0, float("nan")]) == (2, "the loss became nan at step 2")
    assert feed(Divergence(uniform=U), [2.0, 1.0], grads=[1.0, float("inf")]) == (
        2, "the gradient norm became inf at step 2")


def test_nonfinite_weights_are_named():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    frozen = torch.nn.Parameter(torch.tensor([float("inf")]), requires_grad=False)
    assert nonfinite_weights([("a", a), ("b", b), ("frozen", frozen)]) == ["b"]


def _run_dir_files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def test_huge_lr_diverges_keeps_the_last_good_checkpoint_and_saves_nothing(alpaca_file, tmp_path):
    # lr ramps up 10 per step: the first steps train, then the LoRA weights saturate (zero gradients)
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "r": 4}, max_steps=12, lr=1e4, warmup_steps=1000,
                     scheduler="constant", save_every=1, divergence_steps=2)
    with pytest.raises(TrainingDiverged, match=r"^training diverged: the gradients were all zero .* for 2 steps in "
                                               r"a row \(steps \d+-\d+\)\. Lower train.lr \(now 10000\)") as info:
        tunesmith.train(cfg)
    run_dir = tmp_path / "run"
    first_bad = int(re.search(r"steps (\d+)-", str(info.value)).group(1))
    ckpts = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert ckpts and max(ckpts) < first_bad - 1   # only checkpoints from before the weights went bad
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / f'step-{max(ckpts)}'}" in str(info.value)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == str(info.value)
    assert summary["last_checkpoint"].endswith(f"step-{max(ckpts)}")
    files = _run_dir_files(run_dir)
    assert not any(f.startswith(("adapter", ".saving")) or f.endswith(".tmp") for f in files), files
    # the last good checkpoint resumes
    resumed, metrics = tunesmith.train(None, resume=run_dir, **{"train.max_steps": max(ckpts) + 1})
    assert metrics["status"] == "completed" and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_nan_loss_is_one_line_rc_2_and_a_failed_run_directory(alpaca_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: 'random:llama', device: cpu}}\nmethod: {{name: lora, r: 4}}\n"
                   f"data: {{train: {alpaca_file}}}\ntrain: {{max_steps: 4, progress: false}}\n"
                   f"output: {{dir: {tmp_path / 'run'}, plot: false}}\n")
    assert cli.main(["train", str(cfg), "train.lr=1e20"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("data: ")]
    assert len(err) == 1 and err[0].startswith("error: training diverged: the loss became nan at step 2. "
                                               "Lower train.lr (now 1e+20)")
    assert "no checkpoint was saved before it, and no adapter or model was saved" in err[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 2 and "nan" in summary["reason"]
    assert _run_dir_files(tmp_path / "run") == ["config.yaml", "metrics.jsonl", "summary.json"]
    # --resume says there is nothing to resume from, with the reason, before any model loads
    from tunesmith.train import runner
    monkey = pytest.MonkeyPatch()
    monkey.setattr(runner, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    try:
        assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 2
    finally:
        monkey.undo()
    err = capsys.readouterr().err
    assert "no complete checkpoint under" in err and "the run is marked failed: training diverged" in err
    assert f"start the run again: tunesmith train {tmp_path / 'run' / 'config.yaml'}" in err


def test_a_good_run_is_marked_completed(alpaca_file, tmp_path):
    _, metrics = tunesmith.train(run_config(alpaca_file, tmp_path, {"name": "lora", "r": 2}, max_steps=2))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == metrics["status"] == "completed"
    assert not (tmp_path / "run" / ".saving").exists()


def test_an_online_run_whose_policy_went_nan_stops_with_one_line(tmp_path, capsys):
    from helpers import write_jsonl
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} plus {a}?", "final_answer": str(2 * a)}
                                              for a in range(8)])
    cfg = tmp_path / "c.yaml"   # rewards that differ within a group, so that the first update moves the weights
    cfg.write_text(f"model: {{name_or_path: 'random:llama', device: cpu}}\nmethod: {{name: lora, r: 2}}\n"
                   f"data: {{train: {data}, val_split: 0}}\n"
                   "objective: {name: grpo, num_generations: 4, max_tokens: 6, samples: 0, rewards: "
                   "[{function: answer}, {function: format, options: {pattern: '\\d'}}]}\n"
                   "train: {max_steps: 3, batch_size: 2, scheduler: constant, progress: false}\n"
                   f"output: {{dir: {tmp_path / 'run'}, plot: false}}\n")
    assert cli.main(["train", str(cfg), "train.lr=1e20"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("data: ")]
    assert len(err) == 1 and err[0].startswith("error: training diverged: the policy's next-token probabilities "
                                               "became NaN or infinite (sampling the rollout failed: "), err
    assert "Lower train.lr (now 1e+20)" in err[0] and "no adapter or model was saved" in err[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == err[0].removeprefix("error: ")
    assert _run_dir_files(tmp_path / "run") == ["config.yaml", "metrics.jsonl", "summary.json"]
