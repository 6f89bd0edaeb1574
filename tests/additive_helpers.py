"""Shared helpers of the additive-method tests: batches, a 30-step training curve, peft weight
copies, an end-to-end run + reload, and a BERT encoder layer written out by hand."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from helpers import alpaca_rows, cls_rows, ids, rel_err, run_config, tiny, write_jsonl
from safetensors.torch import load_file

import tunesmith
from tunesmith import config as config_mod
from tunesmith.train import checkpoint, runner

VOCAB = 512
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spinning
# threads make them an order of magnitude slower.
torch.set_num_threads(1)


def small(arch: str = "llama", task: str = "causal_lm", seed: int = 1):
    """A tiny model with a small vocabulary (fast LM head)."""
    return tiny(arch, task=task, seed=seed, vocab_size=VOCAB)


def lm_batches(n: int = 3, batch: int = 4, length: int = 10, seed: int = 0) -> list[dict]:
    """Causal-LM batches with right padding in one row (mask 0, labels -100)."""
    out = []
    for i in range(n):
        x = ids(batch, length, vocab=VOCAB, seed=seed + i)
        mask = torch.ones_like(x)
        mask[0, length - 3:] = 0
        labels = x.masked_fill(mask == 0, -100)
        out.append({"input_ids": x, "attention_mask": mask, "labels": labels})
    return out


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits aligned with labels (B, T, V)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def curve(model, batches: list[dict], *, skip: int = 0, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """Losses of ``steps`` AdamW steps; ``skip`` drops leading logits (peft's virtual positions)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        b = batches[i % len(batches)]
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = lm_loss(out.logits[:, skip:], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def copy_encoder(ours, peft_model) -> None:
    """Copy our prompt_encoder's weights into peft's prompt_encoder['default'] (same names)."""
    state = {k[len("prompt_encoder."):]: v for k, v in ours.state_dict().items() if k.startswith("prompt_encoder.")}
    peft_model.prompt_encoder["default"].load_state_dict(state, strict=True)


def perturb(model, scale: float = 0.3, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


DATA = {"sft": ("random:llama", alpaca_rows), "pt": ("random:qwen2", None), "cls": ("random:bert", cls_rows)}


def train_and_reload(tmp_path, method: dict, objective: str, model: str | None = None) -> dict:
    """Train one step in the one loop, then compare ``tunesmith.load(run_dir)`` with the in-training
    form rebuilt from the last checkpoint. Returns the summary plus ``reload_err`` (loaded vs
    checkpoint) and ``change`` (checkpoint vs untrained init), both relative errors of logits."""
    default_model, rows = DATA[objective]
    data = rows(8) if rows else [{"text": f"{r['instruction']} {r['output']}"} for r in alpaca_rows(8)]
    f = write_jsonl(tmp_path / f"{objective}.jsonl", data)
    cfg = run_config(f, tmp_path, method, model=model or default_model, objective=objective, max_steps=1,
                     max_seq_len=32, lr=5e-2)
    cfg["data"]["val_split"] = 0.0
    run_dir, summary = tunesmith.train(cfg)
    loaded, tok = tunesmith.load(run_dir, device="cpu")
    *_, fresh, meth, _ = runner.build(config_mod.load(run_dir / "config.yaml"), objective)
    enc = tok(["the film was great and lovely", "bad"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    init = logits(fresh, batch)
    meth.load_trainable_state(fresh, load_file(str(checkpoint.latest(run_dir) / "trainable.safetensors")))
    trained = logits(fresh, batch)
    return {**summary, "reload_err": rel_err(logits(loaded, batch), trained), "change": rel_err(trained, init)}


def bert_layer(layer, h: torch.Tensor, *, prefix=None, attn_adapter=None, ff_adapter=None, parallel=None):
    """One BERT encoder layer written out (post-LN, no mask), with the additive methods' terms:
    ``prefix`` = (P_k, P_v) each (heads, n, head_dim) before the keys/values (prefix / P-tuning v2);
    ``attn_adapter``/``ff_adapter``: h ↦ h + A(h) on a sublayer's output (Houlsby);
    ``parallel``: FFN(x) + A(x) from the sublayer input x (He et al.)."""
    att = layer.attention
    heads = att.self.num_attention_heads
    B, T, D = h.shape
    split = lambda t: t.view(B, -1, heads, D // heads).transpose(1, 2)  # noqa: E731  (B, heads, T, hd)
    lin = lambda mod, t: F.linear(t, mod.weight, mod.bias)  # noqa: E731  the plain layer, not a wrapper
    q, k, v = split(lin(att.self.query, h)), split(lin(att.self.key, h)), split(lin(att.self.value, h))
    if prefix is not None:
        k = torch.cat([prefix[0].expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix[1].expand(B, -1, -1, -1), v], dim=2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v  # (B, heads, T, hd)
    a = lin(att.output.dense, a.transpose(1, 2).reshape(B, T, D))
    a = a + attn_adapter(a) if attn_adapter is not None else a
    x = att.output.LayerNorm(a + h)
    f = lin(layer.output.dense, layer.intermediate.intermediate_act_fn(lin(layer.intermediate.dense, x)))
    f = f + ff_adapter(f) if ff_adapter is not None else f
    f = f + parallel(x) if parallel is not None else f
    return layer.output.LayerNorm(f + x)


def bert_embed(model, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Word + position (from ``offset``) + token-type embeddings, LayerNorm."""
    e = model.bert.embeddings
    T = input_ids.shape[1]
    pos = e.position_embeddings.weight[offset:offset + T]
    return e.LayerNorm(e.word_embeddings(input_ids) + pos + e.token_type_embeddings.weight[0])


def bert_classify(model, h: torch.Tensor) -> torch.Tensor:
    """Pooler on position 0, then the classifier."""
    return model.classifier(model.bert.pooler(h))


def bert_deep_prompt_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Classification logits of a BERT carrying a key/value prefix (prefix tuning, P-tuning v2),
    computed by hand from its prefix table: every layer attends over [P_k; K], [P_v; V], and the
    real tokens sit after the prompts at positions n.. (as the official implementation on HF BERT)."""
    from tunesmith.methods._virtual import dims
    d, n = dims(model), model.prompt_encoder.num_virtual_tokens
    table = model.prompt_encoder.table().detach()                                        # (n, L·2·H·hd)
    kv = table.view(n, d["layers"] * 2, d["heads"], d["head_dim"]).permute(1, 2, 0, 3)  # (L·2, H, n, hd)
    h = bert_embed(model, input_ids, offset=n)
    for i, layer in enumerate(model.bert.encoder.layer):
        h = bert_layer(layer, h, prefix=(kv[2 * i], kv[2 * i + 1]))
    return bert_classify(model, h)


__all__ = ["small", "lm_batches", "lm_loss", "curve", "max_rel_diff", "copy_encoder", "perturb", "logits",
           "train_and_reload", "bert_layer", "bert_embed", "bert_classify", "bert_deep_prompt_logits", "copy", "VOCAB"]
