"""tunesmith estimate: trainable counts equal the real ones for every method; peaks within 15% of measured RSS."""
import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from tunesmith import cli, config as config_mod
from tunesmith.methods import registry
from tunesmith.models.config import ModelConfig
from tunesmith.models.loader import AUTO_CLASSES, model_config
from tunesmith.planning.estimate import estimate

HERE = Path(__file__).parent
CASES = [("llama", "causal_lm"), ("bert", "classification"), ("t5", "seq2seq")]


def _models(arch: str, task: str):
    config = model_config(ModelConfig(name_or_path=f"random:{arch}"), vocab_size=512,
                          num_labels=2 if task == "classification" else None)
    auto = getattr(tf, AUTO_CLASSES[task])
    with torch.device("meta"):
        meta = auto.from_config(config)
    torch.manual_seed(0)
    return meta, auto.from_config(config)


@pytest.mark.parametrize("arch,task", CASES)
def test_trainable_count_equals_the_real_count_for_every_method(arch, task):
    for name, cls in registry.all_methods().items():
        meta, real = _models(arch, task)
        declared = cls(cls.Config.model_validate({"name": name})).trainable_count(meta)
        # without bitsandbytes' 4-bit layers here, QLoRA is counted as what it trains: LoRA's A and B
        real_cls = registry.get("lora") if name == "qlora" and not cls.available() else cls
        method = real_cls(real_cls.Config.model_validate({"name": real_cls.name}))
        method.device = torch.device("cpu")
        assert declared == method.param_counts(method.apply(real))[0], (arch, name)


def test_estimate_cli_reads_no_weights_and_table_4_1_configs(capsys):
    """T0_3B from its published sizes (examples/estimate/t0_3b): full fine-tuning at fp32 is weights,
    gradients and two Adam moments, 16 bytes a parameter."""
    root = HERE.parents[1]
    cfg = config_mod.load(root / "examples" / "estimate_t0_3b.yaml", ["method=full"])
    est = estimate(cfg, device="cuda", target_len=8)
    assert 2.7e9 < est.total_params < 3.0e9 and est.trainable_params == est.total_params
    p = est.parts
    assert p["weights"] == p["gradients"] == p["optimizer"] / 2 == 4 * est.total_params
    lora = estimate(config_mod.load(root / "examples" / "estimate_t0_3b.yaml"), device="cuda", target_len=8)
    assert lora.trainable_params == 8 * (1024 + 4096) * (24 * 2 + 24 * 4)  # r 8 on q, v: encoder self, decoder self + cross
    assert cli.main(["estimate", str(root / "examples" / "estimate_t0_3b.yaml"), "--device", "cuda",
                     "--budget", "80GB"]) == 0
    assert "fits" in capsys.readouterr().out




# -- against the H200's measured peaks (bench/gpu_train.py, train.speed: auto, torch.cuda.max_memory_allocated) --
H200 = HERE.parents[1] / "bench" / "results" / "h200"
GPU_RUNS = [("gpu_train_auto.json", "auto-8b-lora-b2", "ts+auto"),          # the rows whose plan kept every
            ("gpu_train_auto_1b.json", "auto-1b-lora-b4", "ts+auto"),       # block's activations (no
            ("gpu_train_auto_1b.json", "auto-1b-full-b4", "ts+auto+lim1.0")]  # checkpointing, no offload)


@pytest.mark.parametrize("file,key,impl", GPU_RUNS)
def test_estimate_within_15_percent_of_the_h200_peaks(file, key, impl):
    import sys
    sys.path.insert(0, str(HERE.parents[1] / "bench"))
    from gpu_common import ARCHS, LORA, TARGETS
    row = next(r for r in json.loads((H200 / file).read_text())["results"] if (r["key"], r["impl"]) == (key, impl))
    chosen = row["speed"]["chosen"]
    assert not chosen["gradient_checkpointing"] and not chosen["offload_activations"]
    method = {"name": "full"} if row["method"] == "full" else {"name": row["method"], "target_modules": TARGETS, **LORA}
    cfg = config_mod.load({
        "model": {"name_or_path": "random:llama", "dtype": "bfloat16",
                  "random_overrides": {**ARCHS[row["arch"]], "max_position_embeddings": 8192}},
        "method": method, "data": {"train": "x.jsonl"},
        "train": {"batch_size": row["batch"], "max_seq_len": row["seq"], "compile": chosen["compile"]}})
    predicted = estimate(cfg, device="cuda").peak / 2**30
    assert abs(predicted - row["peak_gib"]) <= 0.15 * row["peak_gib"], (predicted, row["peak_gib"])


def test_a_set_loss_chunk_is_the_chunk_the_estimate_counts():
    """1B LoRA b4 with chunks of 2^27 logits: the loss part is that chunk's fp32 logits and gradient,
    and the peak is within 15% of the H200's (bench/results/h200/gpu_train_1b_lora_host.json)."""
    import sys
    sys.path.insert(0, str(HERE.parents[1] / "bench"))
    from gpu_common import ARCHS, LORA, TARGETS
    row = next(r for r in json.loads((H200 / "gpu_train_1b_lora_host.json").read_text())["results"]
               if (r["key"], r["impl"]) == ("1b-lora-b4", "ts+compile+ce27"))

    def est(**train):
        return estimate(config_mod.load({
            "model": {"name_or_path": "random:llama", "dtype": "bfloat16",
                      "random_overrides": {**ARCHS["1b"], "max_position_embeddings": 8192}},
            "method": {"name": "lora", "target_modules": TARGETS, **LORA}, "data": {"train": "x.jsonl"},
            "train": {"batch_size": 4, "max_seq_len": 2048, "compile": True, **train}}), device="cuda")
    default, large = est(), est(loss_chunk_logits=1 << 27)
    assert default.parts["loss (logits)"] == (1 << 25) * 6.0 and large.parts["loss (logits)"] == (1 << 27) * 6.0
    assert abs(large.peak / 2**30 - row["peak_gib"]) <= 0.15 * row["peak_gib"], (large.peak / 2**30, row["peak_gib"])
