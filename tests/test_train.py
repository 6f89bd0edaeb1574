"""The training loop end to end on tiny models: run directory, resume, merge, objectives."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import tunesmith
from helpers import ids, rel_err, run_config, write_jsonl


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def test_run_directory_layout(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "r": 4}, max_steps=4, eval_every=2)
    cfg["output"]["plot"] = True
    run_dir, metrics = tunesmith.train(cfg)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/step-4/optimizer.pt"):
        assert (run_dir / name).exists(), name
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["objective"] == "sft" and resolved["method"]["r"] == 4
    assert metrics["steps"] == 4 and 0 < metrics["trainable_pct"] < 5
    assert metrics["eval_loss_before"] is not None and metrics["eval_loss_after"] is not None
    assert len(_losses(run_dir)) == 4
    # a second run never overwrites the first
    again, _ = tunesmith.train(cfg)
    assert again != run_dir and again.name == "run-2"


def test_resume_reproduces_uninterrupted_losses(alpaca_file, tmp_path):
    method = {"name": "lora", "r": 4, "dropout": 0.1}
    full_cfg = run_config(alpaca_file, tmp_path / "a", method, max_steps=6, save_every=3, grad_accum=2)
    full_dir, _ = tunesmith.train(full_cfg)
    stopped_cfg = run_config(alpaca_file, tmp_path / "b", method, max_steps=6, save_every=3, grad_accum=2)
    stopped_dir, _ = tunesmith.train(stopped_cfg)
    # simulate a stop after step 3: drop the final checkpoint and the later metrics
    shutil.rmtree(stopped_dir / "checkpoints" / "step-6")
    shutil.rmtree(stopped_dir / "adapter")
    resumed_dir, _ = tunesmith.train(None, resume=stopped_dir)
    assert resumed_dir == stopped_dir
    assert _losses(resumed_dir) == _losses(full_dir)  # exact, on CPU
    a, _ = tunesmith.load(full_dir, device="cpu")
    b, _ = tunesmith.load(resumed_dir, device="cpu")
    x = ids()
    with torch.no_grad():
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


def test_overrides_from_api(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora"}, max_steps=2)
    run_dir, m = tunesmith.train(cfg, **{"train.max_steps": 1}, method={"name": "lora", "r": 2})
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert m["steps"] == 1 and resolved["method"]["r"] == 2


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "freeze", "layers": "last 1"},
                                    {"name": "full"}])
def test_merge_writes_plain_model_with_same_logits(alpaca_file, tmp_path, method):
    run_dir, _ = tunesmith.train(run_config(alpaca_file, tmp_path, method, max_steps=2, lr=1e-2))
    out = tunesmith.merge(run_dir, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tuned, _ = tunesmith.load(run_dir, device="cpu")
    x = ids()
    with torch.no_grad():
        assert rel_err(merged(input_ids=x).logits, tuned(input_ids=x).logits) < 1e-5
    assert not any("lora" in k for k in merged.state_dict())


def test_classification_with_decoder_and_encoder(cls_file, tmp_path):
    for arch in ("llama", "bert"):
        run_dir, m = tunesmith.train(run_config(cls_file, tmp_path / arch, {"name": "lora", "r": 4},
                                                model=f"random:{arch}", max_steps=3))
        assert m["eval_accuracy_after"] is not None
        model, tok = tunesmith.load(run_dir, device="cpu")
        assert model.config.num_labels == 2


def test_text_objective_packs(tmp_path):
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 3} for _ in range(30)]
    f = write_jsonl(tmp_path / "text.jsonl", rows)
    run_dir, m = tunesmith.train(run_config(f, tmp_path, {"name": "lora"}, max_steps=3, max_seq_len=32))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["objective"] == "pt"
    assert m["train_loss_after"] < m["train_loss_before"]


def test_loss_goes_down_and_grad_accum_weights_tokens(alpaca_file, tmp_path):
    run_dir, m = tunesmith.train(run_config(alpaca_file, tmp_path, {"name": "lora", "r": 8}, max_steps=8,
                                            lr=5e-3, grad_accum=2, batch_size=2))
    assert m["train_loss_after"] < m["train_loss_before"]


def test_gradient_checkpointing_gives_the_same_losses(alpaca_file, tmp_path):
    method = {"name": "lora", "r": 4}
    plain, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "a", method, max_steps=3))
    ckpt, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "b", method, max_steps=3,
                                         gradient_checkpointing=True))
    for x, y in zip(_losses(plain), _losses(ckpt)):
        assert abs(x - y) <= 1e-5 * abs(y)
