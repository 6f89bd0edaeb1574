"""What each export target can load, as checks over an adapter's config and tensor names.

Each check returns a reason (str) when the target cannot load the adapter as it is, or None.
The reasons follow the targets' own loaders:
  * vLLM (``vllm/lora/peft_helper.py``): LoRA only; rejects ``use_dora``, non-empty
    ``modules_to_save`` (vllm #9280) and adapter biases; no LoRA on the embedding or output layer
    (vllm #3404, #21500); applies rsLoRA scaling (alpha/√r) itself.
  * llama.cpp (``convert_lora_to_gguf.py`` + ``llama-adapter``): LoRA only; reads ``lora_alpha`` and
    scales by alpha/r at run time (``use_rslora`` is ignored); converts only lora_A/lora_B tensors.
  * peft: anything with a ``peft_type`` it knows.
"""
from __future__ import annotations

from typing import Callable

Check = Callable[[dict, list[str]], "str | None"]
PEFT_TYPES = {"LORA", "ADALORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "LOHA", "LOKR",
              "BOFT", "OFT", "VERA", "FOURIERFT", "HRA", "BONE", "ADAPTION_PROMPT", "LN_TUNING", "POLY",
              "XLORA", "VBLORA", "CPT", "MULTITASK_PROMPT_TUNING", "RANDLORA", "SHIRA", "C3A", "MISS"}


def _is_lora_tensor(key: str) -> bool:
    """lora_A/lora_B of LoRA (``….lora_A.weight``) and of AdaLoRA (``….lora_A``, ``….lora_E``)."""
    return ".lora_A." in key or ".lora_B." in key or key.endswith((".lora_A", ".lora_B", ".lora_E"))


def _saved_modules(cfg: dict, keys: list[str]) -> str | None:
    extra = [k for k in keys if not _is_lora_tensor(k) and not k.endswith("lora_magnitude_vector")
             and not k.endswith(".bias")]
    if cfg.get("modules_to_save") or extra:
        names = cfg.get("modules_to_save") or sorted({k.rsplit(".", 1)[0] for k in extra})[:3]
        return (f"it holds full tensors of modules_to_save ({', '.join(names)}), and {{target}} loads only "
                "lora_A/lora_B pairs")
    return None


def _bias(cfg: dict, keys: list[str]) -> str | None:
    biases = [k for k in keys if k.endswith(".bias") and not _is_lora_tensor(k)]
    if cfg.get("bias", "none") != "none" or biases:
        return f"it holds {len(biases)} trained bias tensors (bias={cfg.get('bias')!r}), which {{target}} does not apply"
    return None


def _lora_only(cfg: dict, keys: list[str]) -> str | None:
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        return f"its peft_type is {ptype!r}, and {{target}} loads only LoRA adapters (peft_type LORA)"
    return None


def _dora(cfg: dict, keys: list[str]) -> str | None:
    if cfg.get("use_dora") or any(k.endswith("lora_magnitude_vector") for k in keys):
        return ("it is DoRA: its magnitude vectors (lora_magnitude_vector) rescale W + B·A, and {target} "
                "applies only B·A")
    return None


def _rslora(cfg: dict, keys: list[str]) -> str | None:
    if cfg.get("use_rslora"):
        return ("it uses rsLoRA scaling alpha/√r, and {target} scales every adapter by alpha/r "
                "(use_rslora is ignored, so the update would be √r times too small); "
                "--fold-rslora rewrites lora_alpha to alpha·√r, which is exact")
    return None


def _patterns(cfg: dict, keys: list[str]) -> str | None:
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        return "it has per-module ranks or alphas (rank_pattern/alpha_pattern), which {target} does not read"
    return None


def _parameter_targets(cfg: dict, keys: list[str]) -> str | None:
    if cfg.get("target_parameters"):
        return ("it adapts weights no linear layer holds (target_parameters: mixture-of-experts experts or router), "
                "and {target} loads LoRA on linear layers only")
    return None


def _known_to_peft(cfg: dict, keys: list[str]) -> str | None:
    ptype = cfg.get("peft_type")
    if ptype not in PEFT_TYPES:
        return f"its peft_type is {ptype!r}, which peft does not know (a tunesmith-only format)"
    return None


def _embeddings(cfg: dict, keys: list[str]) -> str | None:
    hit = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if _is_lora_tensor(k)} & EMBEDDING_LEAVES)
    if hit:
        return (f"it puts LoRA on the embedding or output layer ({', '.join(hit)}), which {{target}} does not "
                "load (only the attention and MLP projections)")
    return None


EMBEDDING_LEAVES = {"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out"}
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)   # the values vLLM's --max-lora-rank accepts


def vllm_command(base: str, modules: list[tuple[str, str, int]]) -> str:
    """``vllm serve`` for ``base`` with LoRA adapters ``modules`` = [(name, path, rank)]: requests pick an
    adapter with ``"model": name``."""
    import shlex
    rank = max(r for _, _, r in modules)
    max_rank = next((m for m in VLLM_MAX_RANKS if m >= rank), rank)
    many = f" --max-loras {len(modules)}" if len(modules) > 1 else ""
    lora = " ".join(shlex.quote(f"{n}={p}") for n, p, _ in modules)
    return f"vllm serve {shlex.quote(base)} --enable-lora --max-lora-rank {max_rank}{many} --lora-modules {lora}"


def _vllm_notes(cfg: dict, out_dir) -> list[str]:
    from pathlib import Path
    out = Path(out_dir).resolve()
    name = out.parent.name if out.name.startswith("export-") else out.name
    return [f"serve with: {vllm_command(_base(cfg), [(name, str(out), int(cfg.get('r') or 8))])}"]


def _llama_cpp_notes(cfg: dict, out_dir) -> list[str]:
    return ["convert to GGUF with llama.cpp's script (--base is the transformers directory of the base):",
            f"  python convert_lora_to_gguf.py {out_dir} --base {_base(cfg)} --outtype f16",
            "then run with: llama-cli -m BASE.gguf --lora ADAPTER.gguf"]


def _peft_notes(cfg: dict, out_dir) -> list[str]:
    return [f"load with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{_base(cfg)}'), "
            f"'{out_dir}')"]


def _base(cfg: dict) -> str:
    return cfg.get("base_model_name_or_path") or "BASE_MODEL_DIR"


TARGETS: dict[str, dict] = {
    "vllm": {"checks": [_lora_only, _dora, _parameter_targets, _saved_modules, _bias, _embeddings], "notes": _vllm_notes,
             "merged_hint": "vllm serve {merged}"},
    "llama.cpp": {"checks": [_lora_only, _dora, _parameter_targets, _rslora, _patterns, _saved_modules, _bias],
                  "notes": _llama_cpp_notes,
                  "merged_hint": "python convert_hf_to_gguf.py {merged} --outfile model.gguf"},
    "peft": {"checks": [_known_to_peft], "notes": _peft_notes,
             "merged_hint": "AutoModelForCausalLM.from_pretrained('{merged}') (a merged model needs no peft)"},
}


def problems(target: str, cfg: dict, keys: list[str], *, fold_rslora: bool = False) -> list[str]:
    """Reasons why ``target`` cannot load the adapter (empty: it can)."""
    out = []
    for check in TARGETS[target]["checks"]:
        if fold_rslora and check is _rslora:
            continue
        reason = check(cfg, keys)
        if reason:
            out.append(reason.format(target=target))
    return out
