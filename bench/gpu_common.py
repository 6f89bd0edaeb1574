"""Shared pieces of the GPU benchmarks: random-weight Llama models built on the GPU, the HF
transformers+peft baseline and the tunesmith setup of each method, FLOP counts and a timed loop.

Both sides train the same way: bf16 weights, bf16 autocast, fused AdamW, gradient clipping at 1.0,
trainable adapter weights in fp32 (peft's default autocast_adapter_dtype and tunesmith's
upcast_trainable), full fine-tuning in pure bf16. The seed fixes weights and tokens, so the first
step's loss of the two sides must agree.
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import torch

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, the MFU denominator
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
LORA = dict(r=16, alpha=32)
# BENCH_DEVICE=cpu BENCH_TINY=1 runs the whole benchmark logic on a CPU with tiny models (a smoke test)
DEV = os.environ.get("BENCH_DEVICE", "cuda")
if os.environ.get("BENCH_TINY"):
    for a in ARCHS.values():
        a.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def event_us(fn, n: int = 30, warmup: int = 5) -> float:
    """Mean µs of ``fn()`` on the GPU over ``n`` calls after ``warmup``, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1000.0


def peak_gib(reserved: bool = False) -> float:
    if DEV != "cuda":
        return 0.0
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30


def build_model(arch: str, seed: int = 0):
    """Random-weight Llama of the named architecture, built directly on the GPU in bf16 with SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**ARCHS[arch], max_position_embeddings=262144, use_cache=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.train()


def quantize_nf4(model) -> None:
    """Replace the 7 projections of every layer by bitsandbytes NF4 (double quant, bf16 compute)."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(DEV)
                setattr(parent, name, q)
    torch.cuda.empty_cache()


def upcast_trainable(model) -> None:
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.float()


# -- the two sides -------------------------------------------------------------------------------
def setup_hf(model, method: str, gc_on: bool):
    """HF transformers + peft as LLaMA-Factory/TRL/axolotl run it; returns (model, loss_fn)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    gck = {"use_reentrant": False}
    if method == "qlora":
        quantize_nf4(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on,
                                                gradient_checkpointing_kwargs=gck)
    if method != "full":
        cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS,
                         task_type="CAUSAL_LM", use_dora=(method == "dora"))
        model = get_peft_model(model, cfg)
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gck)

    def loss_fn(m, batch):
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        return m(**kw, use_cache=False).loss  # mean over label tokens
    return model, loss_fn


def patch_fused_dora() -> None:
    """Route tunesmith's DoraLinear through kernels.dora (what a one-line dispatch in its forward would do)."""
    from tunesmith.kernels.dora import dora_linear, weight_sq_norm
    from tunesmith.kernels.lora import frozen_weight
    from tunesmith.methods.dora import DoraLinear

    def forward(self, x):
        base = self.base_layer
        if self.merged or self.disabled:
            return base(x)
        w = frozen_weight(base)
        if getattr(self, "_w_sq", None) is None:
            self._w_sq = weight_sq_norm(w)
        return dora_linear(x, w, base.bias, self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector,
                           self.scaling, self._w_sq)
    DoraLinear.forward = forward


def inductor_options(flags) -> dict | None:
    """torch.compile options of the bench flags: cg (CUDA graphs, what mode="reduce-overhead" sets),
    combo (independent small kernels, such as the casts of the adapter weights, fused into one; every
    compiled block has it since it measured faster, kernels/compile.py's BLOCK_OPTIONS),
    cpp (inductor's C++ wrapper: each graph's kernels launched from compiled C++, not Python)."""
    opts = {k: True for k, flag in (("triton.cudagraphs", "cg"), ("combo_kernels", "combo")) if flag in flags}
    if "cpp" in flags:  # spelled out: a block's backward graph compiles at its first call, after
        # torch.compile's own setup for cpp_wrapper is undone, and would not keep its kernels' binaries
        opts.update({"cpp_wrapper": True, "triton.store_cubin": True, "triton.autotune_at_compile_time": True,
                     "triton.autotune_cublasLt": False})
    return opts or None   # (what is not set stays as BLOCK_OPTIONS has it)


def setup_tunesmith(model, method: str, gc_on: bool, *, liger: bool = False, packed: bool = False,
                    compile_layers: bool = False, fused_dora: bool = False, ckpt_layers: int | None = None,
                    offload: bool = False, compile_flags: frozenset = frozenset()):
    import tunesmith
    from tunesmith.methods import registry
    from tunesmith.config import TrainConfig
    from tunesmith.train.objectives.causal_lm import CausalLM
    if liger:
        from tunesmith.kernels import liger as liger_mod
        liger_mod.apply(model)
    if packed:
        from tunesmith.kernels import attention
        attention.enable(model)
    opts = {} if method == "full" else {"target_modules": TARGETS, **LORA}
    if method == "qlora" and "qlora" not in registry.all_methods():
        raise RuntimeError("no qlora method registered in tunesmith yet")
    model = tunesmith.apply(model, method, **opts)
    if registry.get(method).upcast_trainable:
        upcast_trainable(model)
    if gc_on:  # what train.gradient_checkpointing / checkpoint_layers / offload_activations run
        from tunesmith.train.accel import enable_checkpointing
        keep = [int(f[4:]) for f in compile_flags if f.startswith("keep")]
        enable_checkpointing(model, ckpt_layers, offload, kept_on_gpu=0 if "offall" in compile_flags else (keep or [1])[0])
    if fused_dora:
        patch_fused_dora()
    if compile_layers:
        from tunesmith.kernels.compile import compile_decoder_layers
        compile_decoder_layers(model, options=inductor_options(compile_flags))
    ce = [int(f[2:]) for f in compile_flags if f.startswith("ce")]   # ceN: train.loss_chunk_logits = 2**N
    objective = CausalLM()
    objective.configure(TrainConfig(compile=compile_layers,   # train.compile also compiles the loss's chunks
                                    loss_chunk_logits=1 << ce[0] if ce else None))

    def loss_fn(m, batch):
        n = max(1, objective.count(batch))  # counted before the forward, as the training loop does
        return objective.lm_loss(m, batch) / n
    return model, loss_fn


def setup_tunesmith_auto(model, method: str, tokens: int, limit_gib: float | None):
    """tunesmith as a run with ``train.speed: auto`` sets it up: the method, then the speed fields chosen by
    train/speed.py (within ``limit_gib`` when given) and applied by train/accel.py. Returns
    (model, loss_fn, what speed chose)."""
    import tunesmith
    from tunesmith.config import TrainConfig
    from tunesmith.methods import registry
    from tunesmith.train import accel, speed
    from tunesmith.train.objectives.causal_lm import CausalLM
    opts = {} if method == "full" else {"target_modules": TARGETS, **LORA}
    model = tunesmith.apply(model, method, **opts)
    if registry.get(method).upcast_trainable:
        upcast_trainable(model)
    tc = TrainConfig(memory_limit=f"{limit_gib}GiB" if limit_gib else None)
    objective = CausalLM()
    tc, report = speed.resolve(tc, model, registry.get(method), torch.device(DEV), tokens,
                               loss_chunks=objective.chunked)   # as train/runner.py calls it
    accel.after_method(model, tc)
    objective.configure(tc)

    def loss_fn(m, batch):
        n = max(1, objective.count(batch))
        return objective.lm_loss(m, batch) / n
    return model, loss_fn, report.as_dict()


# -- FLOPs -------------------------------------------------------------------------------------
def flops_per_token(arch: str, seq: int, full: bool) -> float:
    """Model FLOPs a token (no recomputation counted): 6N for trained weights, 4N for frozen ones
    (forward + input gradient), 6 per LoRA weight, attention 12·L·d·T (PaLM's convention)."""
    a = ARCHS[arch]
    d, f, L, v = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"], a["vocab_size"]
    kv = d // a["num_attention_heads"] * a["num_key_value_heads"]
    per_layer = d * (2 * d + 2 * kv) + 3 * d * f
    n = L * per_layer + d * v
    attn = 12 * L * d * seq
    if full:
        return 6 * n + attn
    r = LORA["r"]
    lora = L * r * (d + d + 2 * (d + kv) + 3 * (d + f))
    return 4 * n + 6 * lora + attn


# -- timing ------------------------------------------------------------------------------------
def random_batches(vocab: int, batch: int, seq: int, n: int = 2, seed: int = 1) -> list[dict]:
    """Batches as tunesmith's training loop hands them over (``to_device``: with their CPU copy)."""
    from tunesmith.data.collate import to_device
    g = torch.Generator(device=DEV).manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq), device=DEV, generator=g).cpu()
        out.append(to_device({"input_ids": x, "labels": x}, torch.device(DEV)))
    return out


def tokens_of(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def train(model, loss_fn, batches, *, steps: int = 15, warmup: int = 3, lr: float = 1e-5,
          total_based: bool = False) -> dict:
    """Median step time over steps-warmup steps; first-step loss; peak memory since the caller's reset
    (``peak_gib``: model build and setup included) and over the training steps alone (``train_peak_gib``).
    ``total_based``: tokens/s as timed tokens over timed seconds (batches of different sizes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    times, losses, toks = [], [], []
    setup_peak = peak_gib()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    gc.disable()  # no collector pauses inside timed steps (both sides); collected once after the loop
    for i in range(steps):
        batch = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs of compiled blocks may replay
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        sync()
        times.append(time.perf_counter() - t0)
        toks.append(tokens_of(batch))
    gc.enable()
    timed = times[warmup:]
    step = statistics.median(timed)
    tok = statistics.median(toks[warmup:])
    tps = sum(toks[warmup:]) / sum(timed) if total_based else tok / step
    return {"step_s": step, "tokens_per_s": tps, "tokens_per_step": tok,
            "first_loss": losses[0], "losses": losses, "step_times": times,
            "peak_gib": max(setup_peak, peak_gib()), "train_peak_gib": peak_gib(),
            "reserved_gib": peak_gib(reserved=True)}


def free() -> None:
    """Release what the last configuration left (the caller drops its references first)."""
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def versions() -> dict:
    import importlib.metadata as md
    dev = torch.cuda.get_device_name(0) if DEV == "cuda" else DEV
    out = {"torch": torch.__version__, "device": dev, "date": time.strftime("%Y-%m-%d")}
    for name in ("transformers", "peft", "liger-kernel", "bitsandbytes", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["tunesmith_commit"] = os.environ.get("TUNESMITH_COMMIT")
    return out
