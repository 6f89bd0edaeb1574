"""The coverage matrix: every registered method × every architecture family (models/families.py).

Each cell builds the family's tiny random model (transformers' own config class, no download),
applies the method with its first invariant case's options, and checks what docs/models.md claims:

* a cell the method declares unsupported (``Method.unsupported``, or a ``requires`` this machine lacks)
  raises one ConfigError that says why, and nothing else is tried;
* one optimizer step of the real loop (``train.loop.Loop.step``, the family's objective: sft, cls or
  seq2seq) changes trainable tensors and nothing frozen (a sparse method's base tensors only at its mask);
* the saved artifact, loaded onto a fresh copy of the base, gives the same logits;
* greedy generation with the KV cache equals a greedy loop of full forward passes (decoders and
  encoder-decoders; in float64, so that no near-tie flips a token);
* where ``merge_refusal`` is None the merged model is a plain transformers model (it saves and reloads
  as one) with the same logits; otherwise merge raises a ConfigError.

Per method, one decoder, one encoder and one encoder-decoder family (rotating through the table) run
in the default tier; the rest of the matrix is marked slow.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import tunesmith
from helpers import rel_err, tiny
from tunesmith import docs
from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.inject import TunedLayer
from tunesmith.models.families import FAMILIES, KINDS, TASK_OF_KIND, of_kind
from tunesmith.models.loader import AUTO_CLASSES
from tunesmith.train import objectives
from tunesmith.train.loop import Loop, LoopState
from tunesmith.train.optim import build_optimizer, build_scheduler

VOCAB = 512
#: Each kind's objective, as a run picks it: the registry's default for the kind's data format.
FORMAT = {"decoder": "alpaca", "encoder": "classification", "seq2seq": "alpaca"}
OBJECTIVE = {kind: objectives.for_format(fmt, encoder_decoder=kind == "seq2seq") for kind, fmt in FORMAT.items()}
CLS = objectives.for_format("classification")
METHODS = registry.all_methods()


def _cells():
    kinds = [of_kind(k) for k in KINDS]
    out = []
    for i, name in enumerate(METHODS):
        fast = {fams[i % len(fams)].name for fams in kinds}
        for fam in FAMILIES:
            out.append(pytest.param(name, fam, marks=() if fam in fast else (pytest.mark.slow,), id=f"{name}-{fam}"))
    return out


def batch_for(kind: str, seed: int = 0, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(x)
    if pad:
        mask[0, 7:] = 0
    if kind == "encoder":
        return {"input_ids": x, "attention_mask": mask, "label": torch.tensor([0, 1, 1])}
    if kind == "seq2seq":
        y = torch.randint(5, VOCAB, (3, 6), generator=g)
        if pad:
            y[1, 4:] = -100
        return {"input_ids": x, "attention_mask": mask, "decoder_labels": y}
    return {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}


def logits(model, batch: dict, kind: str) -> torch.Tensor:
    model.eval()
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if kind == "seq2seq":
        kw["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["decoder_labels"])
    with torch.no_grad():
        return model(**kw).logits


class _Batches:
    def __init__(self, batch):
        self.batch = batch

    def get(self, micro):
        return self.batch


def train_step(model, method, kind: str, batch: dict) -> None:
    """One optimizer step of the one loop, as a run makes it (prepare, hooks, clipping, AdamW)."""
    objective = objectives.get(OBJECTIVE[kind])
    tc = TrainConfig(max_steps=1, lr=1e-2, progress=False, scheduler="constant")
    method.on_train_begin(model, 1)
    method.prepare(model, iter([batch]), objective)
    optimizer = build_optimizer(method, model, tc, torch.device("cpu"))
    loop = Loop(model=model, method=method, objective=objective, optimizer=optimizer,
                scheduler=build_scheduler(optimizer, tc, 1), batches=_Batches(batch), cfg=tc,
                device=torch.device("cpu"), precision="fp32", total_steps=1, on_eval=None,
                on_checkpoint=None, log=None)
    loop.model.train()
    loop.step(LoopState())


def check_only_intended_change(model, method, before: dict, written_before: dict) -> None:
    params = dict(model.named_parameters())
    written = {id(t): n for n, t in getattr(method, "base_tensors", dict)().items()}
    changed = [n for n, p in params.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed or written_before, "the training step changed no trainable tensor"
    for n, p in params.items():
        if p.requires_grad or id(p) in written:
            continue
        assert torch.equal(p, before[n]), f"frozen tensor {n} changed"
    masks = method.masks() if written else {}
    for name, t in method.base_tensors().items() if written else ():
        moved = (t != written_before[name]).reshape(-1).nonzero().reshape(-1)
        allowed = set(masks.get(name, torch.empty(0, dtype=torch.long)).tolist())
        assert set(moved.tolist()) <= allowed, f"{name} changed outside its mask"
    if written:
        assert any(not torch.equal(t, written_before[n]) for n, t in method.base_tensors().items())


def greedy_reference(model, batch: dict, kind: str, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes without a KV cache."""
    x, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if kind == "seq2seq":
            out = torch.full((x.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long)
            for _ in range(steps):
                step = model(input_ids=x, attention_mask=mask, decoder_input_ids=out, use_cache=False).logits
                out = torch.cat([out, step[:, -1].argmax(-1, keepdim=True)], 1)
            return out
        out = x
        for _ in range(steps):
            step = model(input_ids=out, attention_mask=torch.ones_like(out), use_cache=False).logits
            out = torch.cat([out, step[:, -1].argmax(-1, keepdim=True)], 1)
        return out


def check_generation(model, kind: str) -> None:
    twin = copy.deepcopy(model).double().eval()
    if any(hasattr(m, "is_concatenated") for m in twin.modules()):  # transformers' fused experts
        twin.set_experts_implementation("eager")  # its grouped matmuls take no float64
    batch = batch_for(kind, seed=5, pad=False)
    with torch.no_grad():
        got = twin.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, greedy_reference(twin, batch, kind, 3))


def check_merge(model, method, kind: str, batch: dict, tmp_path) -> None:
    reason = method.merge_refusal(model)
    if reason is not None:
        with pytest.raises(ConfigError):
            method.merge(model)
        return
    before = logits(model, batch, kind)
    merged = method.merge(model)
    assert not any(isinstance(m, TunedLayer) or parametrize.is_parametrized(m) for m in merged.modules())
    assert rel_err(logits(merged, batch, kind), before) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    auto = getattr(__import__("transformers"), AUTO_CLASSES[TASK_OF_KIND[kind]])
    reloaded = auto.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert rel_err(logits(reloaded, batch, kind), before) < 1e-5


def _as_stored(base, model, method):
    """A copy of ``base`` for loading ``method``'s artifact: QLoRA's adapter is for the full-precision base,
    so its copy holds what the 4-bit layers store (their dequantized weights) in the model's own layers."""
    from tunesmith.methods import qlora
    from tunesmith.methods.inject import replace_module
    target = copy.deepcopy(base)
    if not isinstance(method, qlora.Qlora):
        return target
    bnb = qlora.require_bitsandbytes()
    for name in qlora.quantized_layers(base):
        q = model.get_submodule(name)
        q = getattr(q, "base_layer", q)
        replace_module(target, name, qlora.plain_layer(bnb, q))
    return target


@pytest.mark.parametrize("name,family", _cells())
def test_cell(name, family, tmp_path):
    cls, fam = METHODS[name], FAMILIES[family]
    torch.manual_seed(0)
    model = tiny(family, task=fam.task, seed=1, vocab_size=VOCAB)
    base = copy.deepcopy(model)
    method = docs.coverage_method(cls)
    reason = method.unsupported(model) or (None if cls.available() else f"needs {cls.requires}")
    if reason is not None:
        with pytest.raises(ConfigError):
            tunesmith.apply(model, name, **docs.coverage_options(cls))
        return
    model = tunesmith.apply(model, name, **docs.coverage_options(cls))
    method = registry.attached(model)
    batch = batch_for(fam.kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    written_before = {n: t.detach().clone() for n, t in getattr(method, "base_tensors", dict)().items()}
    train_step(model, method, fam.kind, batch)
    check_only_intended_change(model, method, before, written_before)

    path = method.save(model, tmp_path, "unused")
    if cls.artifact == "model":
        auto = getattr(__import__("transformers"), AUTO_CLASSES[fam.task])
        loaded = auto.from_pretrained(path, dtype=torch.float32)
    else:
        loaded = cls.load_artifact(_as_stored(base, model, method), path)
    assert rel_err(logits(loaded, batch, fam.kind), logits(model, batch, fam.kind)) < 1e-5

    if fam.kind != "encoder":
        check_generation(model, fam.kind)
    check_merge(model, method, fam.kind, batch, tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_declarations_read_the_structure_alone(family):
    """docs/models.md asks weightless (meta) models; the real tiny model must get the same answers."""
    from tunesmith.models.loader import skeleton
    fam = FAMILIES[family]
    real, meta = tiny(family, task=fam.task, seed=1, vocab_size=VOCAB), skeleton(family)
    for cls in METHODS.values():
        method = docs.coverage_method(cls)
        assert method.unsupported(real) == method.unsupported(meta), cls.name
        assert method.merge_refusal(real) == method.merge_refusal(meta), cls.name


# Every family through the whole run path (data → tokenize → objective → loop → save → load → generate),
# with LoRA and the family's own objective; and classification heads on a decoder and an encoder-decoder.
STAGES = [(fam, OBJECTIVE[f.kind]) for fam, f in FAMILIES.items()] + [("gpt2", CLS), ("t5", CLS)]
FAST_STAGES = {("gpt2", OBJECTIVE["decoder"]), ("mixtral", OBJECTIVE["decoder"]), ("deberta-v2", CLS),
               ("bart", OBJECTIVE["seq2seq"]), ("t5", CLS)}


@pytest.mark.parametrize("family,objective", [
    pytest.param(f, o, marks=() if (f, o) in FAST_STAGES else (pytest.mark.slow,), id=f"{f}-{o}") for f, o in STAGES])
def test_stage(family, objective, tmp_path):
    from helpers import alpaca_rows, cls_rows, run_config, write_jsonl
    classify = objective == CLS
    f = write_jsonl(tmp_path / "d.jsonl", cls_rows(12) if classify else alpaca_rows(12))
    cfg = run_config(f, tmp_path, {"name": "lora", "r": 2}, model=f"random:{family}", max_steps=2,
                     objective=CLS if classify else "auto", max_seq_len=32)
    cfg["data"]["val_split"] = 0.0
    run_dir, summary = tunesmith.train(cfg)
    assert summary["steps"] == 2 and summary["train_loss_after"] is not None
    from tunesmith import config as config_mod
    assert config_mod.load(run_dir / "config.yaml").train.objective == objective
    model, tok = tunesmith.load(run_dir, device="cpu")
    if classify:
        enc = tok(["the film was great"], return_tensors="pt")
        assert model(**enc).logits.shape == (1, 2)
    else:
        assert isinstance(tunesmith.generate(model, "Add 1 and 2.", tokenizer=tok, max_new_tokens=3), str)
