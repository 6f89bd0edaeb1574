"""``train.speed: auto``: the fast settings chosen from the model, the batch and the GPU's memory.

On CUDA, the fields a user leaves unset (``train.compile``, ``gradient_checkpointing``,
``checkpoint_layers``, ``offload_activations``, ``offload_kept_layers``) are chosen here, after the
model and method are in place and before the speed paths are applied (train/accel.py); fields the
user set are kept as they are. On the CPU, or with ``train.speed: off``, unset fields mean off (and
``checkpoint_layers`` all blocks), as they always did.

The choice is the fastest plan whose predicted peak fits the memory limit (``train.memory_limit``,
else the GPU's free memory less a margin). A plan is (checkpointed blocks k, offload on/off, blocks
kept on the GPU m). Its cost and memory come from a model of one transformer block:

* a block that keeps its activations holds ``ACT_BYTES · (4·width + 2·ffn)`` bytes a token (the
  outputs of its matrix products and attention under the compiled-block policy, kernels/compile.py;
  fitted to measured peaks of Llama-3 8B and 3.2 1B blocks: 88 and 42 KiB a token, against 90 and 49
  predicted);
* a checkpointed block holds only its input (width × 2 bytes a token) and recomputes its forward in
  backward: one block's forward time more per step, about a third of its training time;
* with offload, every block except the last m kept ones holds nothing on the GPU; the copies of the
  kept products to the host must hide behind the forward (device→host) and the backward
  (host→device), or the step waits for the excess. The host link's bandwidth is measured once.
  Compiled blocks can offload with no block checkpointed (k = 0).

Of the plans that cost the same, the one that copies the least to the host wins, then the one with
the least memory.

The tokens a plan is for are those of one training forward (``accel.step_tokens``): a packed
micro-batch, the rows of a padded batch (both rows of a preference pair), or one update pass of an
online RL objective's completions. Memory the run holds beside the model through every step (an
online RL run's rollout KV buffers, ``accel.held_bytes``) is added to every plan's peak.

Beside the plan, the chunked loss of sft and pt takes chunks of 2^27 logits instead of 2^25 when
its head is frozen (a trained head's chunks are that large already) and the chosen plan's peak
leaves room for the larger chunk's logits and their gradient: a quarter of the chunks, each a
larger matrix product (1B LoRA on the H200: 79,272 tokens/s against 77,218, at 0.37 GiB more,
bench/results/h200/gpu_train_1b_lora_host.json). A chunk size the user set is counted in every plan.

After the first step the measured peak is compared with the prediction; both are in the summary.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import parse_bytes
from ..errors import ConfigError
from ..kernels import cross_entropy as ce

ACT_BYTES = 2.0           # bytes per element kept for backward (bf16)
EAGER_FACTOR = 1.5        # an uncompiled block also keeps norm and activation intermediates
MARGIN = 0.92             # share of free GPU memory a plan may use
WORKSPACE = 0.25 * 2**30  # allocator slack, cuBLAS workspaces, the loss's chunk (fitted, see above)
TFLOPS = 600e12           # a transformer block's sustained bf16 rate (only ratios of times matter)
LINK_EFFICIENCY = 0.85    # share of the measured host-link bandwidth the offload copies get beside compute
                          # (fitted: 8B LoRA b2 on an H100 ran fastest with 10-12 of 32 blocks checkpointed,
                          # 4 kept; 8 checkpointed was 5% slower, bench/results/gpu_train*.json)
AUTO_FIELDS = ("compile", "gradient_checkpointing", "checkpoint_layers", "offload_activations",
               "offload_kept_layers")


@dataclass(frozen=True)
class BlockShape:
    """What the plan needs of a model: its blocks' count, width, FFN width and parameters, the head's."""
    layers: int
    width: int
    ffn: int
    params: int
    head_params: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> BlockShape | None:
        from ..models.targets import find_blocks
        try:
            _, blocks = find_blocks(model)
        except Exception:  # noqa: BLE001 - a model without a block stack: nothing to plan
            return None
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if not blocks or not width:
            return None
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "d_ff", None) or 4 * width
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return cls(len(blocks), int(width), int(ffn), sum(_numel(p) for p in blocks[0].parameters()),
                   head.weight.numel() if head is not None else 0)

    def kept_bytes(self, tokens: int, compiled: bool, act_bytes: float = ACT_BYTES) -> float:
        return act_bytes * (4 * self.width + 2 * self.ffn) * tokens * (1.0 if compiled else EAGER_FACTOR)

    def input_bytes(self, tokens: int, act_bytes: float = ACT_BYTES) -> float:
        return act_bytes * self.width * tokens

    def forward_s(self, tokens: int) -> float:
        """One block's forward; its backward takes about twice as long."""
        return 2.0 * self.params * tokens / TFLOPS

    def head_s(self, tokens: int) -> float:
        """The LM head's forward and backward, between the last block's forward and the first backward."""
        return 6.0 * self.head_params * tokens / TFLOPS


def _numel(p: torch.Tensor) -> int:
    """The parameters a tensor stands for: a 4-bit weight (bitsandbytes) holds two in a byte and keeps its
    matrix's shape in its ``quant_state``."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


@dataclass(frozen=True)
class Plan:
    checkpointed: int          # blocks that recompute in backward
    offload: bool
    kept_on_gpu: int           # with offload: blocks outside the checkpointed ones that stay on the GPU
    peak_bytes: float
    step_cost: float           # predicted extra time over keeping everything, in one block's forward
    moved_bytes: float = 0.0   # with offload: bytes copied to the host (and back) each step


@dataclass
class SpeedReport:
    """What ``train.speed`` chose and why (written to the summary)."""
    mode: str
    chosen: dict = field(default_factory=dict)
    reason: str = ""
    limit_gib: float | None = None
    predicted_peak_gib: float | None = None
    measured_peak_gib: float | None = None
    host_link_gb_s: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}


def host_link_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a pinned device→host copy (the slower direction on most hosts)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 * nbytes / (time.perf_counter() - t0)


def plans(shape: BlockShape, tokens: int, static: float, compiled: bool, link_bytes_s: float | None,
          fixed: dict, act_bytes: float = ACT_BYTES) -> list[Plan]:
    """Every plan the fields the user fixed allow, with its predicted peak and cost (see the module doc)."""
    n = shape.layers
    kept, inp = shape.kept_bytes(tokens, compiled, act_bytes), shape.input_bytes(tokens, act_bytes)
    fwd = shape.forward_s(tokens)
    gcs = [fixed["gradient_checkpointing"]] if "gradient_checkpointing" in fixed else [False, True]
    offs = [fixed["offload_activations"]] if "offload_activations" in fixed else [False] + ([True] if link_bytes_s else [])
    out = []
    for gc in gcs:
        if not gc:
            out.append(Plan(0, False, 0, static + n * kept, 0.0))
            continue
        for k in ([fixed["checkpoint_layers"]] if "checkpoint_layers" in fixed else range(0, n + 1)):
            for off in offs:
                if not off:   # the working set: one block's products while its backward runs
                    if k:     # (no block recomputed and nothing offloaded is the plan without checkpointing)
                        out.append(Plan(k, False, 0, static + (n - k) * kept + k * inp + kept, float(k)))
                elif not compiled:   # uncompiled blocks offload only the checkpointed blocks' inputs
                    if k:
                        out.append(Plan(k, True, n - k, static + (n - k) * kept + kept,
                                        k + _stall(k * inp, n * fwd, link_bytes_s, fwd), k * inp))
                else:
                    for m in ([fixed["offload_kept_layers"]] if "offload_kept_layers" in fixed else range(n - k + 1)):
                        m = min(m, n - k)
                        moved = (n - k - m) * kept + k * inp
                        window = n * fwd + shape.head_s(tokens) + m * 2 * fwd  # the copies run until backward needs them
                        first = 0.0 if m else kept / link_bytes_s / fwd        # backward's first block comes from the host
                        out.append(Plan(k, True, m, static + (m + 1) * kept,
                                        k + first + _stall(moved, window, link_bytes_s, fwd), moved))
    return out


def _stall(moved: float, window_s: float, link_bytes_s: float, unit_s: float) -> float:
    """Time the step waits for host copies that do not fit in ``window_s``, in units of ``unit_s``."""
    return max(0.0, moved / link_bytes_s - window_s) / unit_s


def choose(candidates: list[Plan], limit_bytes: float) -> Plan | None:
    """The cheapest plan under ``limit_bytes``; None if none fits. Of plans that cost the same, the one
    that copies the least to the host, then the one with the least memory: copies the model predicts to
    hide behind compute still take the copy engines and memory bandwidth (8B QLoRA b2 on the H200, 14
    of 32 blocks offloaded, predicted free: 279 ms a step, bench/results/h200/gpu_train_auto.json)."""
    fitting = [p for p in candidates if p.peak_bytes <= limit_bytes]
    return min(fitting, key=lambda p: (round(p.step_cost, 3), p.moved_bytes, p.peak_bytes)) if fitting else None


@dataclass(frozen=True)
class GpuMemory:
    """What the plan reads off the GPU: bytes allocated (the loaded model), bytes free, the host link."""
    allocated: float
    free: float
    link_bytes_s: float | None

    @classmethod
    def query(cls, device: torch.device, measure_link: bool = True) -> GpuMemory:
        free, _ = torch.cuda.mem_get_info(device)
        link = host_link_bandwidth(device) if measure_link else None
        return cls(float(torch.cuda.memory_allocated(device)), float(free), link)


def static_bytes(model: nn.Module, weights_bytes: float, optimizer_states: int = 2) -> float:
    """Weights (as loaded) plus gradients and optimizer states of the trainable parameters."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights_bytes + trainable * (1 + optimizer_states) + WORKSPACE


def fixed_fields(tc) -> dict:
    """The auto fields the user fixed (not None), as {field: value}, with what they imply unless it is
    set too: ``offload_kept_layers`` implies ``offload_activations``; that or ``checkpoint_layers`` implies
    ``gradient_checkpointing``."""
    fixed = {f: getattr(tc, f) for f in AUTO_FIELDS if getattr(tc, f) is not None}
    if "offload_activations" not in fixed and "offload_kept_layers" in fixed:
        fixed["offload_activations"] = True
    if "gradient_checkpointing" not in fixed and ("checkpoint_layers" in fixed or fixed.get("offload_activations")):
        fixed["gradient_checkpointing"] = True
    return fixed


def chunk_bytes(model: nn.Module, tokens: int, chunk: int, act_bytes: float = ACT_BYTES) -> float:
    """Bytes that loss chunks of ``chunk`` logits take more than the default chunks of the model's head
    (2^27 logits when it is trained, else 2^25; ``WORKSPACE`` counts those), for ``tokens`` a step:
    a chunk holds its fp32 logits and their gradient in the compute dtype. Negative for smaller chunks."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return 0.0
    default = ce.CHUNK_ELEMENTS_TRAINED if head.weight.requires_grad else ce.CHUNK_ELEMENTS
    logits = tokens * head.weight.shape[0]
    return (min(logits, chunk) - min(logits, default)) * (4.0 + act_bytes)


def resolve(tc, model: nn.Module, method_cls, device: torch.device, tokens: int, gpu: GpuMemory | None = None,
            held: float = 0.0, loss_chunks: bool = False):
    """(train config with the auto fields filled, SpeedReport). Never changes a field the user set.
    ``gpu``: the GPU's state (default: read off ``device``); ``held``: bytes the run keeps allocated
    beside the model through every step (``accel.held_bytes``: an online RL run's rollout KV buffers);
    ``loss_chunks``: the objective's loss is chunked and takes ``train.loss_chunk_logits``."""
    fixed = fixed_fields(tc)
    off_defaults = {"compile": False, "gradient_checkpointing": False, "offload_activations": False}
    if tc.speed == "off" or device.type != "cuda":
        update = {f: fixed.get(f, v) for f, v in off_defaults.items() if getattr(tc, f) is None}
        why = "train.speed: off" if tc.speed == "off" else f"the model is on {device.type}: speed paths stay off"
        return tc.model_copy(update=update), SpeedReport(mode=tc.speed, chosen=update, reason=why)
    compiled = fixed.get("compile", method_cls.auto_compile)
    shape = BlockShape.of(model)
    update = {"compile": compiled} if "compile" not in fixed else {}
    if shape is None:
        update.update({f: fixed.get(f, v) for f, v in off_defaults.items()
                       if getattr(tc, f) is None and f not in update})
        return tc.model_copy(update=update), SpeedReport(mode="auto", chosen=update,
                                                         reason="no transformer block stack to plan for")
    gpu = gpu or GpuMemory.query(device, measure_link=fixed.get("offload_activations") is not False)
    user_limit = parse_bytes(tc.memory_limit)
    available = gpu.allocated + gpu.free * MARGIN
    limit = min(user_limit, available) if user_limit else available
    link = gpu.link_bytes_s * LINK_EFFICIENCY if gpu.link_bytes_s else None
    act = 4.0 if tc.precision == "fp32" else ACT_BYTES
    static = static_bytes(model, gpu.allocated) + held
    if loss_chunks and tc.loss_chunk_logits is not None:   # the user's chunk size, as every plan holds it
        static += chunk_bytes(model, tokens, tc.loss_chunk_logits, act)
    candidates = plans(shape, tokens, static, compiled, link, fixed, act)
    plan = choose(candidates, limit)
    report = SpeedReport(mode="auto", limit_gib=limit / 2**30, host_link_gb_s=link / 1e9 if link else None)
    if plan is None:
        least = min(candidates, key=lambda p: p.peak_bytes)
        raise ConfigError(f"train.speed: no checkpointing plan fits {limit / 2**30:.1f} GiB (the least memory, "
                          f"{least.peak_bytes / 2**30:.1f} GiB, checkpoints {least.checkpointed} of {shape.layers} "
                          "blocks); lower train.batch_size or train.max_seq_len, or raise train.memory_limit")
    gc = plan.checkpointed > 0 or plan.offload or fixed.get("gradient_checkpointing") is True
    chosen = {"gradient_checkpointing": gc, "checkpoint_layers": plan.checkpointed if gc else None,
              "offload_activations": plan.offload, "offload_kept_layers": plan.kept_on_gpu if plan.offload else None}
    update.update({f: v for f, v in chosen.items() if getattr(tc, f) is None})
    peak, chunk_note = plan.peak_bytes, ""
    extra = chunk_bytes(model, tokens, ce.CHUNK_ELEMENTS_TRAINED, act) if loss_chunks and tc.loss_chunk_logits is None \
        else 0.0                                      # 0 for a trained head: its chunks are that large already
    if extra > 0 and peak + extra <= limit:
        update["loss_chunk_logits"] = ce.CHUNK_ELEMENTS_TRAINED
        peak += extra
        chunk_note = f"; loss chunks of 2^27 logits (+{extra / 2**30:.2f} GiB)"
    report.chosen = update
    report.predicted_peak_gib = peak / 2**30
    report.reason = (f"{plan.checkpointed} of {shape.layers} blocks checkpointed"
                     + (f", offloaded but {plan.kept_on_gpu} kept on the GPU" if plan.offload else "")
                     + f": predicted peak {peak / 2**30:.1f} GiB within {limit / 2**30:.1f} GiB"
                     + (f" (with {held / 2**30:.1f} GiB of rollout KV buffers)" if held else "") + chunk_note)
    return tc.model_copy(update=update), report
