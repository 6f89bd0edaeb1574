"""``tunesmith estimate``: a run's peak memory and trainable parameters, before any weights load.

The model is built from its config alone (transformers' ``AutoConfig`` of a directory or hub id, a
``random:<family>`` config, a GGUF file's metadata) on the meta device, which gives every tensor's
shape and no storage. The method is asked for its trainable count (``Method.trainable_count``, a
closed form per method) and for its own extras (``memory_extras``, ``prepare_bytes``). The peak of a
training step is then

    weights        Σ numel × bytes of the weight dtype (4-bit targets of QLoRA: NF4 + double-quantized
                   scales, 4.127 bits a weight; trainable weights upcast to fp32 on a 16-bit base)
    gradients      trainable × bytes of the trainable dtype
    optimizer      AdamW: 2 moments a trainable parameter (paged 8-bit AdamW: 1 byte each)
    activations    per block and token, train/speed.py's model of what a block keeps for backward,
                   ``A · (4·width + 2·ffn)`` bytes (A = 4 in fp32, 2 in bf16), times ``EAGER_FACTOR``
                   unless the blocks are compiled (``train.compile``, or ``speed: auto`` on CUDA for a
                   method that compiles by default); with checkpointing every block keeps only its input
                   (A · width) and one block's worth is live while it recomputes. The loss adds its
                   logits: ``LOGIT_COPIES`` fp32 copies of tokens × vocabulary (logits, log-softmax, their
                   gradient) for a language model, or with the chunked loss (``train.chunked_ce``) one
                   chunk's fp32 logits and their bf16 product (kernels/cross_entropy.py).
    extras         what the method adds (virtual tokens' activations, prefix keys and values, DoRA's
                   weight norms, a sparse mask's indices, the 4-bit weights dequantized in backward)
    workspace      on CUDA, train/speed.py's allocator slack and cuBLAS workspaces

and a method that prepares before training (the Fisher of FishMask and Child-tuning D) may peak
then instead: weights + ``prepare_bytes``. On the CPU the figure is what the run adds to the
process's resident memory (the libraries' own few hundred MiB are not counted); on CUDA, what
``torch.cuda.max_memory_allocated`` reports (the CUDA context is not counted either).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..config import RunConfig, parse_bytes
from ..errors import ConfigError
from ..methods import registry
from ..models import loader
from ..train import speed

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGIT_COPIES = 3.0        # fp32 logits, their log-softmax and its gradient live together in backward
NF4_BYTES = 4.127 / 8     # QLoRA: 4-bit weights + fp8 block scales (64) + fp32 second-level scales (256)
CPU_OVERHEAD = 1.10       # the CPU allocator's slack over the tensors it holds (fitted, tests/planning)


@dataclass
class Activations:
    """The shape of one micro-batch as the memory model sees it (handed to the methods' extras)."""
    batch: int
    seq: int                  # tokens a sequence (an encoder-decoder's source side)
    target_seq: int           # an encoder-decoder's target side (0 for others)
    act_bytes: float          # bytes an activation element takes (4 fp32, 2 bf16)
    width: int
    ffn: int
    layers: int               # blocks the tokens of ``seq`` pass (all, or an encoder's)
    target_layers: int        # an encoder-decoder's decoder blocks
    vocab: int
    per_token_block: float    # bytes a block keeps a token for backward, without checkpointing

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def keep(self, tokens: float, layers: int | None = None) -> float:
        """Bytes ``tokens`` more tokens keep over ``layers`` blocks (default all)."""
        return tokens * self.per_token_block * (self.layers if layers is None else layers)


@dataclass
class Estimate:
    model: str
    method: str
    device: str
    weight_dtype: str
    precision: str
    batch_size: int
    seq_len: int
    total_params: int
    trainable_params: int
    checkpointing: bool
    parts: dict = field(default_factory=dict)      # bytes by component of the training step
    activations_full: float = 0.0                  # the blocks' activations without checkpointing
    activations_checkpointed: float = 0.0          # and with every block checkpointed
    prepare_bytes: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    @property
    def train_peak(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.parts.get("weights", 0.0) + self.prepare_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_pct": self.trainable_pct, "peak_bytes": self.peak,
                "peak_gib": self.peak / 2**30, "train_peak_bytes": self.train_peak}


def _meta_model(cfg: RunConfig, task: str, num_labels: int):
    import transformers as tf
    config = _hf_config(cfg, num_labels if task == "classification" else None)
    with torch.device("meta"):
        return getattr(tf, loader.AUTO_CLASSES[task]).from_config(config)


def _hf_config(cfg: RunConfig, num_labels: int | None):
    from pathlib import Path
    name = cfg.model.name_or_path
    gguf = Path(loader.EMBEDDED[name][1]).suffix == ".gguf" if name in loader.EMBEDDED else name.endswith(".gguf")
    if gguf:  # the GGUF's metadata, without de-quantizing it into the cache
        import transformers as tf
        path = (loader._package_dir(*loader.EMBEDDED[name][::2]) / loader.EMBEDDED[name][1]
                if name in loader.EMBEDDED else Path(name).expanduser())
        kw = {"num_labels": num_labels} if num_labels else {}
        return tf.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, **kw)
    return loader.model_config(cfg.model, num_labels=num_labels)


def _task(cfg: RunConfig) -> str:
    from ..train import objectives
    if cfg.train.objective != "auto":
        return objectives.get(cfg.train.objective).task
    if loader.is_encoder_decoder(cfg.model):
        return "seq2seq"
    return "classification" if loader.model_type_of(cfg.model) in loader.ENCODER_TYPES else "causal_lm"


def _shape(model, task: str, batch: int, seq: int, target_seq: int, act_bytes: float,
           compiled: bool = False) -> Activations:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    width = getattr(text, "hidden_size", None) or getattr(text, "d_model", None) or getattr(text, "n_embd")
    ffn = (getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None)
           or getattr(text, "n_inner", None) or getattr(text, "encoder_ffn_dim", None) or 4 * width)
    layers = (getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None)
              or getattr(text, "n_layer", None) or getattr(text, "encoder_layers"))
    dec = 0
    if task == "seq2seq":
        dec = getattr(text, "num_decoder_layers", None) or getattr(text, "decoder_layers", None) or layers
    per_token = speed.BlockShape(layers, int(width), int(ffn), 0).kept_bytes(1, compiled=compiled, act_bytes=act_bytes)
    vocab = model.get_output_embeddings().weight.shape[0] if task != "classification" else 0
    return Activations(batch, seq, target_seq if task == "seq2seq" else 0, act_bytes, int(width), int(ffn),
                       int(layers), int(dec), int(vocab), per_token)


def _blocks(act: Activations, checkpointed: bool) -> float:
    """The blocks' activations: an encoder-decoder's decoder blocks see the target tokens (and cross-attend,
    keeping 1.5 times a self-attention block's activations a token)."""
    stacks = [(act.batch * act.seq, act.layers, 1.0)]
    if act.target_layers:
        stacks.append((act.batch * act.target_seq, act.target_layers, 1.5))
    if not checkpointed:
        return sum(t * n * act.per_token_block * f for t, n, f in stacks)
    inputs = sum(t * n * act.act_bytes * act.width for t, n, _ in stacks)
    return inputs + max(t * act.per_token_block * f for t, _, f in stacks)  # one block recomputing


def estimate(cfg: RunConfig, *, device: str | None = None, num_labels: int = 2, target_len: int | None = None,
             checkpointing: bool | None = None) -> Estimate:
    """Predict the peak memory of a training step of ``cfg`` on ``device`` (cpu, cuda; default the
    config's, auto meaning CUDA where this machine has it) without loading a weight."""
    dev = device or cfg.model.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(dev).type
    task = _task(cfg)
    model = _meta_model(cfg, task, num_labels)
    method_cls = registry.get(cfg.method.name)
    method = method_cls(cfg.method)
    method.device = torch.device(dev)
    wdtype = ("bfloat16" if dev_type == "cuda" else "float32") if cfg.model.dtype == "auto" else cfg.model.dtype
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if dev_type == "cuda" else "fp32")
    act_bytes = 4.0 if precision == "fp32" and wdtype == "float32" else 2.0
    total = registry.Method.param_counts(method, model)[1]  # every weight once (tied ones once)
    trainable = method.trainable_count(model)  # before apply: the count, as the method declares it
    wb = DTYPE_BYTES[wdtype]
    upcast = method.upcast_trainable and wb < 4
    tb = 4 if upcast or wb == 4 else wb
    seq = cfg.train.max_seq_len
    compiled = dev_type == "cuda" and (cfg.train.compile if cfg.train.compile is not None
                                       else cfg.train.speed == "auto" and method_cls.auto_compile)
    act = _shape(model, task, cfg.train.batch_size, seq, target_len or seq, act_bytes, compiled)
    ckpt = bool(cfg.train.gradient_checkpointing) if checkpointing is None else checkpointing
    weights = method.quantized_weight_bytes(model, wb) if hasattr(method, "quantized_weight_bytes") else total * wb
    parts = {
        "weights": float(weights) + (trainable * (tb - wb) if upcast else 0.0),
        "gradients": float(trainable * tb),
        "optimizer": float(trainable * (2 if cfg.train.optimizer == "paged_adamw_8bit" else 2 * tb)),
    }
    full_act, ckpt_act = _blocks(act, False), _blocks(act, True)
    parts["activations"] = ckpt_act if ckpt else full_act
    if act.vocab:
        logit_tokens = act.batch * (act.target_seq if task == "seq2seq" else act.seq)
        chunked = cfg.train.chunked_ce is True or (cfg.train.chunked_ce == "auto" and dev_type == "cuda")
        if chunked:   # one chunk's fp32 logits (a trained head takes larger chunks) and their matmul output
            from ..kernels import cross_entropy as ce
            chunk = cfg.train.loss_chunk_logits or (ce.CHUNK_ELEMENTS_TRAINED if cfg.method.name == "full"
                                                    else ce.CHUNK_ELEMENTS)
            parts["loss (logits)"] = min(logit_tokens * act.vocab, chunk) * (4.0 + act_bytes)
        else:
            parts["loss (logits)"] = logit_tokens * act.vocab * 4.0 * LOGIT_COPIES
    for what, nbytes in method.memory_extras(model, act).items():
        parts[f"{cfg.method.name}: {what}"] = float(nbytes)
    if dev_type == "cuda":
        parts["workspace"] = speed.WORKSPACE
    else:
        for k in ("activations", "loss (logits)"):
            if k in parts:
                parts[k] *= CPU_OVERHEAD
    est = Estimate(model=cfg.model.name_or_path, method=cfg.method.name, device=dev, weight_dtype=wdtype,
                   precision=precision, batch_size=cfg.train.batch_size, seq_len=seq, total_params=total,
                   trainable_params=trainable, checkpointing=ckpt, parts=parts, activations_full=full_act,
                   activations_checkpointed=ckpt_act, prepare_bytes=float(method.prepare_bytes(model, act)))
    if task == "seq2seq":
        est.notes.append(f"encoder-decoder: {seq} source and {target_len or seq} target tokens a sequence")
    return est


def fits(est: Estimate, budget: str | int) -> bool:
    limit = parse_bytes(budget, "--budget")
    if not limit:
        raise ConfigError(f"--budget {budget!r}: give a size, e.g. 24GiB")
    return est.peak <= limit


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def format_estimate(est: Estimate) -> str:
    lines = [f"model        {est.model} ({est.total_params:,} parameters, {est.weight_dtype}) on {est.device}, "
             f"{est.precision}",
             f"method       {est.method}: {est.trainable_params:,} trainable ({est.trainable_pct:.4f}%)",
             f"batch        {est.batch_size} × {est.seq_len} tokens"
             + (", activation checkpointing" if est.checkpointing else "")]
    lines += [f"  {k:<34} {gib(v):>12}" for k, v in est.parts.items()]
    lines.append(f"  {'activations (no checkpointing)':<34} {gib(est.activations_full):>12}")
    lines.append(f"  {'activations (checkpointing)':<34} {gib(est.activations_checkpointed):>12}")
    if est.prepare_bytes:
        lines.append(f"  {'before training (prepare)':<34} {gib(est.prepare_bytes):>12}  (beside the weights)")
    lines.append(f"peak         {gib(est.peak)}")
    lines += [f"note         {n}" for n in est.notes]
    return "\n".join(lines)
