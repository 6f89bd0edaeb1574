"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", eq. 5):

    Y = X · doubleDequant(c1_FP32, c2_k-bit, W_NF4) + s · X A B

The frozen base: every linear layer of the transformer blocks is stored in 4 bits (NF4, or FP4)
with double quantization of the block scales (§3), computed in bf16 on CUDA (fp32 on the CPU); LoRA
adapters (fp32) sit on the target layers. Quantization is bitsandbytes' ``Linear4bit``, on CUDA or on
the CPU where the installed bitsandbytes has a CPU backend (checked once, by quantizing a small layer);
without it, ``apply`` raises one ConfigError naming what is missing and the alternative (method lora,
same fields, full-precision base). The paged 8-bit AdamW of the paper
(§3, "Paged Optimizers") is :func:`paged_adamw_8bit`.

The saved adapter is a plain peft LoRA for the full-precision base (``base_model_name_or_path``),
so it loads as method lora anywhere; loading it quantizes nothing.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util

import torch
from torch import nn

from .inject import Conv1DAsLinear, TunedLayer, as_linear, conv1d_from, replace_module, resolve_targets, tuned_layers, unwrap
from .lora import Lora, LoraConfig, LoraLinear
from .registry import Method, register
from ..errors import ConfigError
from .configs.qlora import QloraConfig

COMPUTE_DTYPE = torch.bfloat16


def require_bitsandbytes(feature: str = "method qlora"):
    """bitsandbytes, imported lazily; one ConfigError naming what is missing otherwise."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:
        raise ConfigError(f"{feature}: 4-bit quantization runs in bitsandbytes, which is not installed "
                          "(pip install bitsandbytes). Use method.name: lora instead (the same fields, with a "
                          "full-precision base).") from None


@functools.cache
def cpu_4bit() -> bool:
    """Whether the installed bitsandbytes quantizes and runs a 4-bit layer on the CPU (its CPU backend)."""
    try:
        bnb = importlib.import_module("bitsandbytes")
        q = quantize_linear(bnb, nn.Linear(64, 64), "nf4", True, torch.device("cpu"))
        return bool(torch.isfinite(q(torch.ones(1, 64))).all())
    except Exception:   # an older bitsandbytes without a CPU backend raises from its CUDA library
        return False


def check_device(device: torch.device) -> None:
    if device.type == "cuda" or (device.type == "cpu" and cpu_4bit()):
        return
    raise ConfigError(f"method qlora: the model is on {device}, and the installed bitsandbytes "
                      f"{_bnb_version()} has no 4-bit layers there; use model.device: cuda, a bitsandbytes "
                      "with a CPU backend (pip install -U bitsandbytes) for model.device: cpu, or method.name: "
                      "lora on this device")


def _bnb_version() -> str:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def plain_layer(bnb, q: nn.Module, delta: torch.Tensor | None = None) -> nn.Module:
    """A 4-bit layer dequantized (+ ``delta``) back to the model's own layer type (Conv1D for GPT-2)."""
    lin = dequantize_linear(bnb, q, delta)
    return conv1d_from(lin) if getattr(q, "from_conv1d", False) else lin


def quantized_layers(model: nn.Module) -> list[str]:
    """The linear layers QLoRA stores in 4 bits: every linear layer of the blocks, never the output head,
    a classification model's task head (its pooler is trained beside the head in full precision), nor
    the modules the model keeps in fp32 (transformers' ``_keep_in_fp32_modules``, as its own 4-bit loading does)."""
    from ..models.targets import HEADS
    fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])   # T5's wo: its input is cast to the weight's dtype
    return [n for n in resolve_targets(model, "all-linear", field="method (qlora base quantization)")
            if not any(n == h or n.endswith("." + h) for h in HEADS) and not fp32 & set(n.split("."))]


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 on CUDA (the paper's), fp32 elsewhere."""
    return COMPUTE_DTYPE if device.type == "cuda" else torch.float32


def quantize_linear(bnb, lin: nn.Linear, quant_type: str, double_quant: bool,
                    device: torch.device | None = None) -> nn.Module:
    """``lin`` as a frozen bitsandbytes Linear4bit on ``device`` (default: lin's); the weight is
    quantized as it reaches ``device``, so a CPU layer never occupies the GPU in full precision."""
    device = device or lin.weight.device
    dtype = compute_dtype(device)
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, dtype,
                          compress_statistics=double_quant, quant_type=quant_type, device="meta")
    w = lin.weight.data.to(dtype)
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, **q.weight.__dict__).to(device)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.to(device, dtype), requires_grad=False)
    q.requires_grad_(False)
    if hasattr(q, "support_avx512bf16_for_cpu"):
        # bitsandbytes' CPU inference path repacks the weight in place for a bf16 kernel that takes only
        # some shapes; the plain path computes in the compute dtype like training does, for every shape
        q.support_avx512bf16_for_cpu = False
    q.source_dtype = lin.weight.dtype  # what merge() dequantizes back to
    return q


def dequantize_linear(bnb, q: nn.Module, delta: torch.Tensor | None = None) -> nn.Linear:
    """A plain nn.Linear (in the layer's dtype before quantizing) holding dequant(W) (+ ``delta``)."""
    dtype = getattr(q, "source_dtype", COMPUTE_DTYPE)
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
    if delta is not None:
        w = w + delta.to(w.dtype)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.data.to(dtype), requires_grad=False)
    return lin


class QloraLinear(LoraLinear):
    """LoRA beside a 4-bit base: LoraLinear's forward (fused through ``kernels.lora.frozen_weight`` for
    bitsandbytes bases); merging in place is refused, as 4-bit storage cannot take the update."""

    def merge(self) -> None:
        raise NotImplementedError("a 4-bit base cannot take the update in place; Qlora.merge() dequantizes")

    unmerge = merge


@register
class Qlora(Lora):
    loads_peft = False  # a saved QLoRA adapter is a plain LoRA: peft adapters load as method lora
    Config = QloraConfig
    invariant_cases = []  # 4-bit bases need CUDA; the GPU benchmark covers the numerics
    stages_on_cpu = True  # a run loads on the CPU; apply() quantizes each layer on its way to the GPU
    requires = "bitsandbytes, and a CUDA GPU or bitsandbytes' CPU backend"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("bitsandbytes") is not None and (torch.cuda.is_available() or cpu_4bit())

    def apply(self, model: nn.Module) -> nn.Module:
        """Quantize every linear layer of the blocks (never the output head) onto ``self.device`` (default:
        where the model is), move the rest of the model there, then add LoRA."""
        bnb = require_bitsandbytes()
        device = self.device or next(model.parameters()).device
        check_device(device)
        for name in quantized_layers(model):
            lin = as_linear(model.get_submodule(name))  # GPT-2's Conv1D in nn.Linear layout
            if not isinstance(lin, bnb.nn.Linear4bit):  # a model loaded in 4 bits is used as it is
                q = quantize_linear(bnb, lin, self.cfg.quant_type, self.cfg.double_quant, device)
                q.from_conv1d = isinstance(lin, Conv1DAsLinear)
                replace_module(model, name, q)
        model.to(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the full-precision weights just freed
        return super().apply(model)

    def quantized_weight_bytes(self, model: nn.Module, weight_bytes: int) -> float:
        """Every linear layer of the blocks in NF4 (4 bits and the double-quantized block scales), the rest
        (embeddings, norms, the output head) at the compute dtype."""
        from ..planning.estimate import NF4_BYTES
        quantized = sum(as_linear(model.get_submodule(n)).weight.numel()
                        for n in quantized_layers(model))
        return quantized * NF4_BYTES + (Method.param_counts(self, model)[1] - quantized) * 2

    def memory_extras(self, model: nn.Module, act) -> dict[str, float]:
        """Backward dequantizes one 4-bit weight at a time to bf16 (and its input gradient's product)."""
        sizes = [as_linear(model.get_submodule(n)).weight.numel()
                 for n in quantized_layers(model)]
        return {"dequantized weight": 2.0 * 2 * max(sizes, default=0)}

    def make_layer(self, name: str, base: nn.Module) -> QloraLinear:
        layer = QloraLinear(base, self.cfg.r, self.cfg.alpha, self.cfg.dropout, self.cfg.use_rslora)
        layer.reset(self.cfg.init)
        return layer

    def merge(self, model: nn.Module) -> nn.Module:
        """Dequantize every 4-bit layer into a plain nn.Linear, adding the LoRA update where there is one
        (layers kept in full precision take their update in place)."""
        bnb = require_bitsandbytes()
        for name, layer in list(tuned_layers(model)):
            if isinstance(layer.base_layer, bnb.nn.Linear4bit):
                replace_module(model, name, plain_layer(bnb, layer.base_layer, layer.delta_weight().detach()))
            else:   # a layer kept in full precision (_keep_in_fp32_modules) merges as LoRA's does
                LoraLinear.merge(layer)
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit) and not isinstance(module, TunedLayer):
                replace_module(model, name, plain_layer(bnb, module))
        return unwrap(model)

    @classmethod
    def from_saved(cls, peft_cfg: dict, meta: dict | None) -> Lora:
        """The adapter is a plain LoRA for the full-precision base: it loads as method lora."""
        if meta is None:
            return Lora.from_saved(peft_cfg, None)
        fields = {k: v for k, v in meta["method"].items() if k not in ("quant_type", "double_quant")}
        return Lora(LoraConfig.model_validate({**fields, "name": "lora"}))


def paged_adamw_8bit(param_groups: list[dict], train_cfg) -> torch.optim.Optimizer:
    """bitsandbytes' PagedAdamW8bit over ``param_groups`` with train.lr/adam_betas/adam_eps/weight_decay
    (for ``train.optimizer: paged_adamw_8bit``)."""
    bnb = require_bitsandbytes("train.optimizer paged_adamw_8bit")
    if not torch.cuda.is_available():
        raise ConfigError("train.optimizer paged_adamw_8bit: its paged states live in CUDA unified memory, and "
                          "this machine has no CUDA GPU; use train.optimizer: adamw")
    return bnb.optim.PagedAdamW8bit(param_groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas),
                                    eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay)
