"""train.speed: auto — the memory model against peaks measured on the GPU, the plan it picks, and the
rules of resolution (a field the user set is never changed; nothing changes on the CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tunesmith
from helpers import tiny
from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.train import speed

PROBE = Path(__file__).resolve().parents[1] / "bench" / "results" / "h200" / "gpu_train_probe.json"
ARCHS = {  # bench/gpu_common.py's random-weight Llama-3 8B and 3.2 1B
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def _meta_model(arch: str, method: str):
    """The benchmark's model on the meta device (no memory), the method applied, trainable tensors in fp32."""
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**ARCHS[arch]), dtype=torch.bfloat16)
        if method == "lora":
            model = tunesmith.apply(model, "lora", r=16, alpha=32, target_modules=TARGETS)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    return model


def test_a_4bit_weight_counts_the_parameters_it_stands_for():
    """A bitsandbytes 4-bit weight packs two parameters a byte; the block's forward time is that of the
    matrix it stands for, whose shape its quant_state keeps."""
    from types import SimpleNamespace
    model = tiny()
    plain = speed.BlockShape.of(model).params
    q = model.model.layers[0].self_attn.q_proj
    packed = torch.nn.Parameter(torch.zeros(q.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=q.weight.shape)
    q.weight = packed
    assert speed.BlockShape.of(model).params == plain


def test_a_bitsandbytes_4bit_weight_keeps_its_shape_where_the_plan_reads_it():
    bnb = pytest.importorskip("bitsandbytes")
    w = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4").to("cpu")
    assert w.numel() == 32 * 64 // 2 and speed._numel(w) == 32 * 64


def _weights(model) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def _measured(key: str, impl: str) -> float:
    rows = json.loads(PROBE.read_text())["results"]
    return next(r["train_peak_gib"] for r in rows if r["key"] == key and r["impl"] == impl)


@pytest.mark.parametrize("key, impl, arch, method, batch, ck, keep", [
    ("8b-lora-b2", "ts+compile+off+ck11+keep4", "8b", "lora", 2, 11, 4),
    ("8b-lora-b2-nogc", "ts+compile", "8b", "lora", 2, 0, None),
    ("1b-full-b4", "ts+compile", "1b", "full", 4, 0, None),
])
def test_predicted_peaks_match_the_h200_measurements(key, impl, arch, method, batch, ck, keep):
    model = _meta_model(arch, method)
    shape = speed.BlockShape.of(model)
    tokens = batch * 2048
    fixed = {"gradient_checkpointing": bool(ck)}
    if ck:
        fixed.update(checkpoint_layers=ck, offload_activations=True, offload_kept_layers=keep)
    [plan] = speed.plans(shape, tokens, speed.static_bytes(model, _weights(model)), True, 54e9, fixed)
    measured = _measured(key, impl)
    assert abs(plan.peak_bytes / GIB - measured) <= 0.08 * measured, (plan.peak_bytes / GIB, measured)


def _choose(arch, method, batch, limit_gib, link=54e9):
    model = _meta_model(arch, method)
    link = link * speed.LINK_EFFICIENCY if link else None
    candidates = speed.plans(speed.BlockShape.of(model), batch * 2048, speed.static_bytes(model, _weights(model)),
                             True, link, {})
    return speed.choose(candidates, limit_gib * GIB)


def test_a_large_gpu_keeps_every_activation():
    plan = _choose("8b", "lora", 2, 130)
    assert (plan.checkpointed, plan.offload) == (0, False)
    assert _choose("1b", "full", 4, 16.9).checkpointed == 0   # within HF + liger-kernel's 16.9 GiB


def test_a_tight_limit_offloads_and_checkpoints_only_what_the_host_link_cannot_carry():
    plan = _choose("8b", "lora", 2, 0.8 * 22.4)        # 0.8 × transformers + peft's measured peak
    assert plan.offload and plan.peak_bytes <= 0.8 * 22.4 * GIB
    assert 9 <= plan.checkpointed <= 13 and plan.kept_on_gpu >= 1  # measured best on the H100: 10-12, 4 kept
    slow = _choose("8b", "lora", 2, 0.8 * 22.4, link=10e9)      # a slow host link: more recomputation instead
    assert slow.checkpointed > plan.checkpointed
    no_link = _choose("8b", "lora", 2, 0.8 * 22.4, link=None)   # no offload possible: plain checkpointing
    assert no_link is None or not no_link.offload


def test_compiled_blocks_may_offload_with_none_checkpointed_and_ties_copy_the_least():
    """Between the plan without checkpointing (26.8 GiB) and the tight limit above, no block needs to
    recompute: the activations of a few blocks go to host memory. Of the plans that cost the same, the
    chosen one copies the least (keeps the most blocks that fit), not the one with the least memory."""
    model = _meta_model("8b", "lora")
    link = 54e9 * speed.LINK_EFFICIENCY
    candidates = speed.plans(speed.BlockShape.of(model), 2 * 2048, speed.static_bytes(model, _weights(model)),
                             True, link, {})
    limit = 24 * GIB
    plan = speed.choose(candidates, limit)
    assert (plan.checkpointed, plan.offload, plan.step_cost) == (0, True, 0.0)
    free = [p for p in candidates if p.peak_bytes <= limit and p.step_cost == 0.0]
    assert len(free) > 1 and plan.moved_bytes == min(p.moved_bytes for p in free) > 0
    assert plan.peak_bytes == max(p.peak_bytes for p in free)      # the most blocks kept that fit
    uncompiled = speed.plans(speed.BlockShape.of(model), 4096, 0.0, False, link, {})
    assert all(p.checkpointed > 0 for p in uncompiled if p.offload)   # they offload checkpointed inputs only


def test_more_memory_never_costs_speed():
    costs = [_choose("8b", "lora", 2, g).step_cost for g in (18, 20, 24, 28, 40)]
    assert costs == sorted(costs, reverse=True) and costs[-1] == 0


# -- resolution -----------------------------------------------------------------------------------
def _resolve(model, gpu, **train):
    tc = TrainConfig(**train)
    return speed.resolve(tc, model, registry.get("lora"), torch.device("cuda"), 64, gpu=gpu)


def test_on_the_cpu_unset_fields_mean_off_and_set_ones_stay():
    model = tiny()
    tc, report = speed.resolve(TrainConfig(checkpoint_layers=1), model, registry.get("lora"), torch.device("cpu"), 64)
    assert (tc.compile, tc.gradient_checkpointing, tc.offload_activations, tc.checkpoint_layers) == (False, True, False, 1)
    assert "cpu" in report.reason


def test_an_offload_plan_without_checkpointed_blocks_resolves_to_valid_fields(monkeypatch):
    """A plan of 0 checkpointed blocks with offload still turns gradient checkpointing on (the offload
    hooks ride on it) and writes checkpoint_layers 0, which enable_checkpointing accepts with offload."""
    model = tunesmith.apply(tiny(), "lora")
    monkeypatch.setattr(speed, "choose", lambda candidates, limit: speed.Plan(0, True, 1, 1e6, 0.0, 1e6))
    tc, report = _resolve(model, speed.GpuMemory(allocated=1e6, free=1e12, link_bytes_s=50e9))
    assert (tc.gradient_checkpointing, tc.checkpoint_layers, tc.offload_activations, tc.offload_kept_layers) == \
        (True, 0, True, 1)
    assert "0 of 2 blocks checkpointed, offloaded but 1 kept on the GPU" in report.reason


def test_auto_fills_only_unset_fields_and_reports_why():
    model = tunesmith.apply(tiny(), "lora")
    big = speed.GpuMemory(allocated=1e6, free=1e12, link_bytes_s=50e9)
    tc, report = _resolve(model, big)
    assert (tc.compile, tc.gradient_checkpointing) == (True, False)
    assert report.chosen == {"compile": True, "gradient_checkpointing": False, "checkpoint_layers": None,
                             "offload_activations": False, "offload_kept_layers": None}
    assert "0 of 2 blocks checkpointed" in report.reason
    tc, report = _resolve(model, big, compile=False, checkpoint_layers=1)
    assert (tc.compile, tc.gradient_checkpointing, tc.checkpoint_layers) == (False, True, 1)
    assert "compile" not in report.chosen and "checkpoint_layers" not in report.chosen


def test_a_limit_nothing_fits_is_refused_naming_the_fields():
    model = tunesmith.apply(tiny(), "lora")
    small = speed.GpuMemory(allocated=1e6, free=1e12, link_bytes_s=None)
    with pytest.raises(ConfigError, match=r"train.speed: no checkpointing plan fits 0.0 GiB.*train.memory_limit"):
        _resolve(model, small, memory_limit="1MB")


def test_memory_limit_is_validated_as_a_size():
    assert speed.parse_bytes("24GiB") == 24 * GIB and speed.parse_bytes("1.5e9") == 1_500_000_000
    from tunesmith import config as config_mod
    with pytest.raises(ConfigError, match=r"train.memory_limit: .*'lots' is not a size; write e.g. 24GiB"):
        config_mod.validate({"method": "lora", "data": {"train": "x.jsonl"}, "train": {"memory_limit": "lots"}})


def test_the_plan_counts_both_rows_of_a_pair_batch():
    """A padded DPO batch of 2 pairs is 4 rows of max_seq_len; SFT's 2; a packed micro-batch its budget."""
    from tunesmith.train import accel
    from tunesmith.train.objectives import get
    tc = TrainConfig(batch_size=2, max_seq_len=128)
    assert accel.step_tokens(tc, get("dpo")) == 512
    assert accel.step_tokens(tc, get("sft")) == 256
    assert accel.step_tokens(tc.model_copy(update={"padding_free": True, "max_tokens_per_batch": 300}), get("dpo")) == 300


def test_the_plan_counts_an_rl_update_pass_of_completions():
    """GRPO, 2 prompts × G 8: a pass of micro_batch 4 completions of prompt (≤ 128) + 512 new tokens;
    with micro_batch null all 16 rows."""
    from tunesmith.train import accel
    from tunesmith.train.objectives import get
    tc = TrainConfig(batch_size=2, max_seq_len=128)
    grpo = {"name": "grpo", "num_generations": 8, "max_tokens": 512, "rewards": [{"function": "length_penalty"}]}
    assert accel.step_tokens(tc, get({**grpo, "micro_batch": 4})) == 4 * 640
    assert accel.step_tokens(tc, get({**grpo, "micro_batch": None})) == 16 * 640


def test_an_rl_run_plans_with_its_rollout_kv_buffers_held():
    """The rollout engine's static KV buffers stay allocated through the update: accel.held_bytes is
    their size (the bytes the fast path allocates for the sampler's slots and columns), nothing for
    SFT or on the CPU, and the plan adds it to every peak, so a limit that fits the update alone
    now checkpoints."""
    from tunesmith.infer.engine.fast import StaticRunner
    from tunesmith.train import accel
    from tunesmith.train.objectives import get
    from tunesmith.train.rl.rollout import Sampler
    model = tunesmith.apply(tiny(), "lora")
    tc = TrainConfig(batch_size=2, max_seq_len=40)
    grpo = get({"name": "grpo", "num_generations": 4, "max_tokens": 24, "rewards": [{"function": "length_penalty"}]})
    held = accel.held_bytes(tc, grpo, model, torch.device("cuda"))
    runner = StaticRunner(model, max_batch=Sampler.slots(tc, grpo.cfg), max_len=Sampler.max_len(model, grpo.cfg, 40))
    assert held == sum(t.numel() * t.element_size() for t in (*runner.k, *runner.v)) > 0
    assert accel.held_bytes(tc, get("sft"), model, torch.device("cuda")) == 0
    assert accel.held_bytes(tc, grpo, model, torch.device("cpu")) == 0
    gpu = speed.GpuMemory(allocated=1e6, free=1e12, link_bytes_s=None)
    tokens = accel.step_tokens(tc, grpo)
    free_plan, _ = speed.resolve(tc, model, registry.get("lora"), torch.device("cuda"), tokens, gpu=gpu)
    assert free_plan.gradient_checkpointing is False
    _, report = speed.resolve(tc, model, registry.get("lora"), torch.device("cuda"), tokens, gpu=gpu)
    need = report.predicted_peak_gib * GIB
    limit = TrainConfig(batch_size=2, max_seq_len=40, memory_limit=f"{int(need + held / 2)}B")
    tight, report = speed.resolve(limit, model, registry.get("lora"), torch.device("cuda"), tokens, gpu=gpu, held=held)
    assert tight.gradient_checkpointing is True and "rollout KV buffers" in report.reason


def test_a_frozen_head_takes_larger_loss_chunks_where_the_plan_leaves_room():
    """Chunks of 2^27 logits instead of 2^25 for sft/pt's chunked loss over a frozen head, when the
    chosen plan's peak plus the larger chunk's logits and gradient fit; never over a set field."""
    model = tunesmith.apply(tiny(), "lora")
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = (1 << 27) // vocab + 1                                # a step's logits fill the larger chunk
    extra = speed.chunk_bytes(model, tokens, 1 << 27)
    assert extra == ((1 << 27) - (1 << 25)) * 6.0                  # fp32 logits and their bf16 gradient
    big = speed.GpuMemory(allocated=1e6, free=1e12, link_bytes_s=None)

    def resolve(gpu=big, **train):
        return speed.resolve(TrainConfig(**train), model, registry.get("lora"), torch.device("cuda"), tokens,
                             gpu=gpu, loss_chunks=True)
    tc, report = resolve()
    assert tc.loss_chunk_logits == 1 << 27 and report.chosen["loss_chunk_logits"] == 1 << 27
    assert "loss chunks of 2^27 logits" in report.reason
    without, _ = speed.resolve(TrainConfig(), model, registry.get("lora"), torch.device("cuda"), tokens, gpu=big)
    assert without.loss_chunk_logits is None                     # an objective without the chunked loss
    assert report.predicted_peak_gib == pytest.approx(_peak(model, tokens, big) + extra / GIB)
    room = (_peak(model, tokens, big) * GIB + extra / 2 - 1e6) / speed.MARGIN   # the plan fits, the chunk does not
    tc, report = resolve(gpu=speed.GpuMemory(allocated=1e6, free=room, link_bytes_s=None))
    assert tc.loss_chunk_logits is None and "loss chunks" not in report.reason
    tc, report = resolve(loss_chunk_logits=1 << 20)
    assert tc.loss_chunk_logits == 1 << 20 and "loss_chunk_logits" not in report.chosen
    smaller = ((1 << 20) - (1 << 25)) * 6.0                        # a set chunk is counted in the plan
    assert report.predicted_peak_gib == pytest.approx(_peak(model, tokens, big) + smaller / GIB)
    full = tiny()                                                  # a trained head: its chunks are 2^27 already
    assert full.get_output_embeddings().weight.requires_grad and speed.chunk_bytes(full, tokens, 1 << 27) == 0
    assert speed.chunk_bytes(model, 4, 1 << 27) == 0               # a step's logits fit one default chunk


def _peak(model, tokens, gpu) -> float:
    _, report = speed.resolve(TrainConfig(), model, registry.get("lora"), torch.device("cuda"), tokens, gpu=gpu)
    return report.predicted_peak_gib
