"""Virtual tokens: the shared machinery of prompt, P-tuning (v1/v2) and prefix tuning.

The trained tensors live in a :class:`VirtualTokens` module attached to the model as
``prompt_encoder``. Hooks on the model's backbone (``model.base_model``: LlamaModel, BertModel …)
add the virtual tokens inside, so ``model(input_ids=..., attention_mask=...)`` takes plain inputs
and returns outputs aligned with the real tokens; objectives, classification heads (last non-pad
token, [CLS] pooler) and ``model.generate`` work unchanged. No model class is subclassed.

* Input level (prompt tuning, P-tuning v1): on a fresh call (no cache, or an empty one) ``n``
  placeholder ids are put before ``input_ids``; a hook on the input embedding module replaces their
  embeddings by the prompts; the backbone's hidden states of the ``n`` virtual positions are
  dropped on the way out. Layout: ``[virtual × n][input tokens]``, as in HF peft.
* Key/value level (prefix tuning, P-tuning v2): on a fresh call the backbone's
  ``transformers.DynamicCache`` (passed under the name the installed transformers takes:
  :mod:`tunesmith.models.compat`) is filled with ``n`` trained key/value vectors per layer (the
  public ``Cache.update`` API), so the real tokens attend to them and sit at positions ``n..``.

In both cases the 2-D attention mask gets ``n`` ones in front, and ``position_ids`` (and
``cache_position`` where a model still takes it) are shifted by ``n``, on every call: during
generation the cache holds the virtual tokens and the caller's counters do not.

Encoder-decoders (T5, BART …): input-level prompts go before the encoder's input (Lester et al. 2021
tune T5 so; HF peft does the same), and the encoder's outputs keep them, so the decoder's
cross-attention reads them too: a hook on the whole model extends the encoder attention mask it hands
the decoder, including during generation, where transformers runs the encoder once on its own.
Key/value prefixes go into the decoder's self-attention cache (the self-attention half of the
``EncoderDecoderCache``), every decoder layer its own; transformers' encoders take no cache. The
key/value shapes come from the model itself (:func:`kv_dims`: one token through it).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..models.compat import cache_kwargs, pop_cache
from .inject import TunedLayer

ATTR = "prompt_encoder"


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _first(cfg, names: tuple[str, ...]):
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), None)


def dims(model: nn.Module) -> dict[str, int]:
    """Hidden size, layer count and key/value shape of a transformers model, from its config (an
    encoder-decoder's: its decoder's, where key/value prefixes go)."""
    cfg = text_config(model)
    dec = seq2seq(model)
    heads = (dec and _first(cfg, ("decoder_attention_heads",))) or cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = _first(cfg, ("head_dim", "d_kv")) or cfg.hidden_size // heads
    layers = (dec and _first(cfg, ("num_decoder_layers", "decoder_layers"))) or cfg.num_hidden_layers
    return {"hidden": model.get_input_embeddings().weight.shape[1], "layers": layers,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def kv_backbone(model: nn.Module) -> nn.Module:
    """The module whose forward takes the KV cache that key/value prefixes go into."""
    return model.get_decoder() if seq2seq(model) else getattr(model, "base_model", model)


def new_cache(model: nn.Module):
    """An empty KV cache of the kind ``kv_backbone(model)`` takes."""
    from transformers import DynamicCache, EncoderDecoderCache
    cfg = kv_backbone(model).config
    if seq2seq(model):
        return EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))
    return DynamicCache(config=cfg)


def self_attention_cache(cache):
    """The part of ``cache`` that self-attention reads (an EncoderDecoderCache's first half)."""
    return getattr(cache, "self_attention_cache", cache)


@torch.no_grad()
def kv_dims(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head size as the model's own attention layers write them into a KV
    cache: one token through :func:`kv_backbone` (no architecture-specific code). A model whose
    attention takes no cache (DeBERTa, ModernBERT) gets a ConfigError."""
    known = getattr(model, "_tunesmith_kv_dims", None)
    if known is not None:
        return known
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # a weightless model (tunesmith estimate) runs no forward: its config says
        d = dims(model)
        return {"layers": d["layers"], "kv_heads": d["kv_heads"], "head_dim": d["head_dim"]}
    layers = [k for k, _ in _cached_kv(model, torch.ones(1, dtype=torch.long))]
    if not layers:
        raise ConfigError(f"{type(model).__name__}'s attention takes no key/value cache, which is where prefix "
                          "methods put their virtual keys and values; use an input-level prompt method "
                          "(prompt, ptuning) or another method for this model")
    out = {"layers": len(layers), "kv_heads": layers[0].shape[1], "head_dim": layers[0].shape[3]}
    object.__setattr__(model, "_tunesmith_kv_dims", out)
    return out


def _cached_kv(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer that wrote the KV cache when ``ids`` (n,) went through
    :func:`kv_backbone` in eval mode: each (1, kv_heads, n, head_dim)."""
    backbone, cache = kv_backbone(model), new_cache(model)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        backbone(input_ids=ids.to(device)[None], **cache_kwargs(backbone, cache))
    finally:
        model.train(was_training)
    return [(layer.keys, layer.values) for layer in self_attention_cache(cache).layers
            if getattr(layer, "keys", None) is not None and layer.keys.numel()]


@torch.no_grad()
def token_kv(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor | None:
    """(n, layers·2·kv_heads·head_dim) float, in the prefix table's layout: the keys and values the frozen
    model computes for ``n`` tokens drawn uniformly from its vocabulary (a prefix started from real
    tokens' activations, Li & Liang 2021 §7.2, instead of N(0, 1) entries far off the model's scale).
    None for a weightless (meta) model."""
    if model.get_input_embeddings().weight.device.type == "meta":
        return None
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    kv = [t for pair in _cached_kv(model, ids) for t in pair]       # 2·layers of (1, kv_heads, n, head_dim)
    table = torch.cat(kv, dim=0).permute(2, 0, 1, 3)                # (n, 2·layers, kv_heads, head_dim)
    return table.reshape(n, -1).float().clone()


def kv_shape(model: nn.Module) -> dict[str, int]:
    """:func:`dims` with the key/value entries as the model writes its cache (:func:`kv_dims`)."""
    return {**dims(model), **kv_dims(model)}


class VirtualTokens(TunedLayer):
    """``n`` virtual tokens and the hooks that add them; ``disabled`` turns the hooks off.

    Subclasses define how the tensor is produced (a table, an MLP, an LSTM …) via ``table()``,
    which returns the (folded) tensor that is saved: ``(n, width)``.
    """

    input_level: ClassVar[bool]

    def __init__(self, num_virtual_tokens: int):
        super().__init__(nn.Identity())
        self.num_virtual_tokens = num_virtual_tokens
        self._added = 0
        self._pending = False
        self._mask_may_be_extended = False  # an encoder's mask, extended already by _cross_mask_hook

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    # -- installation ---------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        if hasattr(model, ATTR):
            raise ConfigError(f"{type(model).__name__} already carries virtual tokens; apply one prompt method only")
        model.add_module(ATTR, self)
        self.pad_id = getattr(text_config(model), "pad_token_id", None) or 0
        embeddings = model.get_input_embeddings()
        if self.input_level and seq2seq(model):  # prompts before the encoder input, kept in its outputs
            self._mask_may_be_extended = True
            encoder = model.get_encoder()
            encoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            model.register_forward_pre_hook(self._cross_mask_hook, with_kwargs=True)
            embeddings = encoder.get_input_embeddings()  # the encoder's own module (weights tied to the model's)
        else:
            backbone = kv_backbone(model) if not self.input_level else getattr(model, "base_model", model)
            backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            backbone.register_forward_hook(self._post_hook)
        if self.input_level:
            embeddings.register_forward_hook(self._embed_hook)

    # -- hooks ----------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        self._added = 0
        if self.disabled:
            return None
        kwargs = dict(kwargs)
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("a model with virtual tokens takes its inputs as keyword arguments")
            kwargs["input_ids"] = args[0]
        cache = pop_cache(kwargs)
        if cache is not None:
            kwargs.update(cache_kwargs(module, cache))
        fresh = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        ref = kwargs.get("input_ids")
        ref = ref if ref is not None else kwargs["inputs_embeds"]
        n, batch, device = self.num_virtual_tokens, ref.shape[0], ref.device
        added = n if (fresh and self.input_level) else 0
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("virtual tokens need a 2-D attention mask (batch, length)")
            if not (self._mask_may_be_extended and mask.shape[1] == ref.shape[1] + n):
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        for key in ("position_ids", "cache_position"):
            if kwargs.get(key) is not None:
                kwargs[key] = _shift(kwargs[key], n, added)
        if fresh:
            self._begin(module, kwargs, batch, device)
        self._added = added
        return (), kwargs

    def _begin(self, backbone, kwargs, batch, device) -> None:
        """Add the virtual tokens to a fresh call's inputs (subclass family specific)."""
        raise NotImplementedError

    def _cross_mask_hook(self, module, args, kwargs):
        """An encoder-decoder's call: the encoder attention mask (which the decoder's cross-attention
        also reads) gets ``n`` ones in front unless it already has them."""
        mask = kwargs.get("attention_mask")
        if self.disabled or mask is None:
            return None
        if args:
            raise TypeError("a model with virtual tokens takes its inputs as keyword arguments")
        n, enc = self.num_virtual_tokens, kwargs.get("encoder_outputs")
        if enc is not None:
            real = enc[0].shape[1] - n        # encoder outputs hold the prompts already
        else:
            ref = kwargs.get("input_ids")
            real = (ref if ref is not None else kwargs["inputs_embeds"]).shape[1]
        if mask.shape[1] == real:
            kwargs = {**kwargs, "attention_mask": torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)}
        return (), kwargs

    def _post_hook(self, module, args, output):
        n, self._added = self._added, 0
        if n and isinstance(output, dict):
            for key in ("last_hidden_state", "logits"):
                if output.get(key) is not None and output[key].dim() >= 3:
                    output[key] = output[key][:, n:]
            if output.get("hidden_states") is not None:
                output["hidden_states"] = tuple(h[:, n:] for h in output["hidden_states"])
        return output

    def _embed_hook(self, module, args, output):
        return output  # input-level subclasses override


def _shift(t: torch.Tensor, n: int, added: int) -> torch.Tensor:
    """Positions of real tokens move by ``n``; ``added`` new virtual positions 0..added-1 go first."""
    t = t + n
    if not added:
        return t
    head = torch.arange(added, device=t.device, dtype=t.dtype)  # (added,)
    head = head.expand(*t.shape[:-1], added)                    # (..., added)
    return torch.cat([head, t], dim=-1)


class InputPrompt(VirtualTokens):
    """Virtual-token embeddings before the input (Lester et al. 2021; Liu et al. 2021).

    ``table()`` is ``(n, hidden)``: the embeddings that replace the ``n`` placeholder ids.
    """

    input_level = True

    def _begin(self, backbone, kwargs, batch, device) -> None:
        n = self.num_virtual_tokens
        if kwargs.get("input_ids") is not None:
            ids = kwargs["input_ids"]
            kwargs["input_ids"] = torch.cat([ids.new_full((batch, n), self.pad_id), ids], dim=1)
            self._pending = True
        else:
            emb = kwargs["inputs_embeds"]
            prompts = self.table().to(emb.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, H)
            kwargs["inputs_embeds"] = torch.cat([prompts, emb], dim=1)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)

    def _embed_hook(self, module, args, output):
        if not self._pending:
            return output
        self._pending = False
        n = self.num_virtual_tokens
        prompts = self.table().to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)  # (B, n, H)
        return torch.cat([prompts, output[:, n:]], dim=1)


class KVPrefix(VirtualTokens):
    """Trained keys and values before every layer's own (Li & Liang 2021; Liu et al. 2022).

    ``table()`` is ``(n, layers * 2 * kv_heads * head_dim)`` in HF peft's layout: for token i and
    layer l, key = slot 2l and value = slot 2l+1.
    """

    input_level = False

    def __init__(self, num_virtual_tokens: int, shape: dict[str, int]):
        super().__init__(num_virtual_tokens)
        self.shape = dict(shape)

    def width(self) -> int:
        s = self.shape
        return s["layers"] * 2 * s["kv_heads"] * s["head_dim"]

    def install(self, model: nn.Module) -> None:
        object.__setattr__(self, "_model", model)  # a reference, for new_cache
        super().install(model)

    def _begin(self, backbone, kwargs, batch, device) -> None:
        s, n = self.shape, self.num_virtual_tokens
        cache = pop_cache(kwargs)
        if cache is None:
            cache = new_cache(self._model)
        dtype = backbone.get_input_embeddings().weight.dtype
        kv = self.table().to(dtype).view(n, s["layers"] * 2, s["kv_heads"], s["head_dim"])
        kv = kv.permute(1, 2, 0, 3)                          # (layers*2, kv_heads, n, head_dim)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)   # (layers*2, B, kv_heads, n, head_dim)
        target = self_attention_cache(cache)
        for layer in range(s["layers"]):
            target.update(kv[2 * layer], kv[2 * layer + 1], layer)
        kwargs.update(cache_kwargs(backbone, cache))


class PromptTable(InputPrompt):
    """A plain table of prompt embeddings (prompt tuning, and folded P-tuning)."""

    def __init__(self, num_virtual_tokens: int, hidden: int, init: torch.Tensor | None = None):
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def table(self) -> torch.Tensor:
        return self.embedding.weight


class PrefixTable(KVPrefix):
    """A plain table of per-layer keys and values (P-tuning v2, and folded prefix tuning)."""

    def __init__(self, num_virtual_tokens: int, shape: dict[str, int], init: torch.Tensor | None = None):
        super().__init__(num_virtual_tokens, shape)
        self.embedding = nn.Embedding(num_virtual_tokens, self.width())
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def table(self) -> torch.Tensor:
        return self.embedding.weight


def carrier(model: nn.Module) -> VirtualTokens:
    return getattr(model, ATTR)
