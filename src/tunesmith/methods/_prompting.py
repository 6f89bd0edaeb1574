"""The shared Method behaviour of the virtual-token methods (prompt, ptuning, prefix, ptuning_v2).

Training builds a method-specific ``prompt_encoder`` (a table, an MLP, an LSTM …). The artifact
is HF peft's prompt-learning format: ``adapter_model.safetensors`` holds ``prompt_embeddings``,
the encoder's output folded into one ``(n, width)`` tensor (peft saves the same), plus the task
head for classification; ``adapter_config.json`` is a peft config, so peft loads it too. Loading
rebuilds the folded form: a plain table.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError
from ..models.compat import checkpointing_on, takes_cache
from ..models.targets import task_heads
from . import peft_format
from ._virtual import ATTR, PrefixTable, PromptTable, VirtualTokens, carrier, dims, kv_backbone, kv_shape, seq2seq
from .inject import freeze_all, unfreeze_modules
from .registry import Method, MethodConfig, attach, module_params

TABLE_KEY = "prompt_embeddings"


class VirtualMethod(Method):
    """Base of the virtual-token methods: install, heads, peft-format save/load."""

    artifact = "adapter"
    loads_peft = True
    identity_at_init = False  # virtual tokens change every output from the start
    mergeable = False
    unmergeable_reason = "its virtual tokens are extra inputs, not a change of the weights"
    supports_packing = False  # one set of virtual tokens per sequence, not per packed document
    invariant_cases = [
        {},
        {"arch": "qwen2", "options": {"num_virtual_tokens": 3}},
        {"arch": "bert", "task": "classification", "options": {"num_virtual_tokens": 4}},
    ]

    def make(self, model: nn.Module) -> VirtualTokens:
        """The trainable prompt encoder for ``model``."""
        raise NotImplementedError

    @classmethod
    def folded(cls, model: nn.Module, num_virtual_tokens: int, table: torch.Tensor) -> VirtualTokens:
        """The inference form rebuilt from a saved ``(n, width)`` table."""
        raise NotImplementedError

    def peft_fields(self, model: nn.Module) -> dict:
        """Method-specific entries of adapter_config.json."""
        return {}

    @classmethod
    def config_from_peft(cls, peft_cfg: dict) -> MethodConfig:
        return cls.Config(name=cls.name, num_virtual_tokens=peft_cfg["num_virtual_tokens"])

    def encoder_params(self, model: nn.Module) -> int | None:
        """Closed form of the prompt encoder's parameters (None: counted on the model)."""
        return None

    def trainable_count(self, model: nn.Module) -> int:
        n = self.encoder_params(model)
        return super().trainable_count(model) if n is None else n + module_params(model, task_heads(model))

    # -- building -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all(model)
        self._install(model, self.make(model))
        return model

    def _install(self, model: nn.Module, encoder: VirtualTokens) -> None:
        w = model.get_input_embeddings().weight
        encoder.to(device=w.device, dtype=w.dtype)
        encoder.install(model)
        for p in encoder.parameters():
            p.requires_grad_(True)
        self.saved_modules = unfreeze_modules(model, task_heads(model))

    # -- artifact -------------------------------------------------------------------------
    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        d = dims(model)
        return {"peft_type": self.peft_type, "task_type": peft_format.task_type(model),
                "base_model_name_or_path": base_name, "num_virtual_tokens": self.cfg.num_virtual_tokens,
                # one submodule: an encoder-decoder's prompts go before the encoder input only, which is
                # also all that peft's forward reads of the table for its default of two
                "token_dim": d["hidden"], "num_transformer_submodules": 1, "num_attention_heads": d["heads"],
                "num_layers": d["layers"], "inference_mode": True,
                "modules_to_save": self.saved_modules or None, **self.peft_fields(model)}

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        path = out_dir / "adapter"
        path.mkdir(parents=True, exist_ok=True)
        heads = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(ATTR + ".")}
        tensors = {TABLE_KEY: carrier(model).table().detach().contiguous().cpu(), **peft_format.to_peft_keys(heads)}
        save_file(tensors, str(path / peft_format.WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"method": self.cfg.model_dump(mode="json"), "base": base_name}
        peft_format.write_configs(path, self.peft_config(model, base_name), meta)
        return path

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        peft_cfg, state = peft_format.read_adapter(path)
        meta = peft_format.read_meta(path)
        cfg = cls.Config.model_validate(meta["method"]) if meta else cls.config_from_peft(peft_cfg)
        if TABLE_KEY not in state:
            raise ConfigError(f"{path}: no {TABLE_KEY!r} tensor in {peft_format.WEIGHTS_NAME}")
        table = state.pop(TABLE_KEY)
        method = cls(cfg)
        freeze_all(model)
        method._install(model, cls.folded(model, cfg.num_virtual_tokens, _check(table, cls, model, cfg, path)))
        peft_format.load_into(model, state, path)
        attach(model, method)
        return model


def _check(table: torch.Tensor, cls, model, cfg, path: Path) -> torch.Tensor:
    want = (cfg.num_virtual_tokens, cls.table_width(model))
    if tuple(table.shape) != want:
        raise ConfigError(f"{path}: {TABLE_KEY} has shape {tuple(table.shape)}, but {cls.name} with "
                          f"num_virtual_tokens={cfg.num_virtual_tokens} on this model needs {want} "
                          "(is the adapter for another base model?)")
    return table


class InputPromptMethod(VirtualMethod):
    """Virtual tokens at the input: the saved table is ``(n, hidden)``."""

    @classmethod
    def table_width(cls, model: nn.Module) -> int:
        return dims(model)["hidden"]

    @classmethod
    def folded(cls, model, num_virtual_tokens, table):
        return PromptTable(num_virtual_tokens, table.shape[1], init=table)

    def memory_extras(self, model: nn.Module, act) -> dict[str, float]:
        """The n virtual tokens of every sequence pass every block like real ones."""
        return {"virtual tokens' activations": act.keep(act.batch * self.cfg.num_virtual_tokens)}


class KVPrefixMethod(VirtualMethod):
    """Virtual keys/values in every layer: the saved table is ``(n, layers·2·kv_heads·head_dim)``.

    peft describes grouped-query models by ``token_dim = kv_heads·head_dim`` and
    ``num_attention_heads = kv_heads``; the config written here does the same.
    """

    @classmethod
    def table_width(cls, model: nn.Module) -> int:
        d = kv_shape(model)
        return d["layers"] * 2 * d["kv_heads"] * d["head_dim"]

    @classmethod
    def folded(cls, model, num_virtual_tokens, table):
        return PrefixTable(num_virtual_tokens, kv_shape(model), init=table)

    def memory_extras(self, model: nn.Module, act) -> dict[str, float]:
        """Each sequence's copy of the prefix keys and values in every layer, and their gradient."""
        n = act.batch * self.cfg.num_virtual_tokens * self.table_width(model) * act.act_bytes
        return {"prefix keys/values": 2.0 * n}

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        d = kv_shape(model)
        out = {**super().peft_config(model, base_name), "token_dim": d["kv_heads"] * d["head_dim"],
               "num_attention_heads": d["kv_heads"]}
        if seq2seq(model):
            # peft's encoder-decoder prefix puts one layer's keys into every decoder layer and drops the
            # cross-attention half; this prefix (each decoder layer its own) is tunesmith's format
            out.update(peft_type=None, tunesmith_method=self.name)
        return out

    def unsupported(self, model: nn.Module) -> str | None:
        if not takes_cache(kv_backbone(model)):
            return "the model's attention takes no key/value cache, where the prefix goes (prompt and ptuning work)"
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        reason = self.unsupported(model)
        if reason:
            raise ConfigError(f"method {self.name}: {type(kv_backbone(model)).__name__}: {reason}")
        return super().apply(model)

    def prepare(self, model: nn.Module, batches, objective) -> None:
        if checkpointing_on(model):
            raise ConfigError(f"method {self.name}: train.gradient_checkpointing=true drops the key/value cache "
                              "that carries the prefix in transformers; set train.gradient_checkpointing=false")
