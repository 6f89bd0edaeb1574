"""LoRA options: rsLoRA and PiSSA parity with HF peft, init schemes, LoRA+ groups, peft interop.

The helpers at the top (peft parity: copy weights, logits + gradients, a 30-step training curve)
are shared by test_dora.py and test_adalora.py.
"""
from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch

import tunesmith
from tunesmith import api  # api.train: `tunesmith.train` is shadowed by the subpackage once imported
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.lora import Lora, LoraLinear, PissaLinear, lora_trainable_count
from tunesmith.methods.inject import disable_adapters, tuned_layers

from helpers import ids, rel_err, tiny

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- shared peft-parity helpers -----------------------------------------------------------------

def ours_name(peft_name: str) -> str:
    """A peft parameter name as tunesmith names the same tensor."""
    n = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def peft_params(pm) -> dict[str, torch.nn.Parameter]:
    return {ours_name(n): p for n, p in pm.named_parameters() if p.requires_grad}


def copy_from_peft(model, pm) -> None:
    """Copy peft's trainable tensors into ours; every trainable tensor must have a counterpart."""
    theirs = peft_params(pm)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(theirs[n])


def perturb_peft(pm, std: float = 0.05, seed: int = 3) -> None:
    """Move peft's trainable tensors off their init (B = 0 would make A's gradient vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


VOCAB = 512  # a small vocabulary so that 30 steps visibly train


def batch(step: int = 0) -> torch.Tensor:
    """Two alternating fixed batches (memorisable, so the loss curve moves)."""
    return ids(batch=4, length=16, vocab=VOCAB, seed=step % 2)


def logits_and_grads(model, extra=None):
    """Logits and per-parameter gradients (tunesmith names) of mean-CE (+ extra) on a fixed batch."""
    model.train()
    for p in model.parameters():
        p.grad = None
    x = batch()
    out = model(input_ids=x, labels=x)
    loss = out.loss + (extra(model) if extra else 0)
    loss.backward()
    grads = {ours_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_parity(ours, pm, extra=None, tol: float = 1e-5) -> None:
    lo, go = logits_and_grads(ours, extra)
    lp, gp = logits_and_grads(pm)
    assert rel_err(lo, lp) <= tol
    assert set(go) == set(gp)
    for n in go:
        assert rel_err(go[n], gp[n]) <= tol, n
    assert any(g.abs().sum() > 0 for g in go.values())


def train_curve(model, steps: int = 30, lr: float = 3e-3, extra=None, after_step=None) -> list[float]:
    """Loss per step of a fixed AdamW loop: same seed, data and order for every model.

    lr 3e-3: at 1e-2 Adam amplifies a 1e-7 relative weight perturbation into a 0.5% loss gap by
    step 30 on these tiny models, so curves would compare CPU rounding, not the methods."""
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        x = batch(step)
        out = model(input_ids=x, labels=x)
        loss = out.loss + (extra(model) if extra else 0)
        loss.backward()
        opt.step()
        if after_step:
            after_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_curves_match(ours: list[float], theirs: list[float], tol: float = 0.01) -> None:
    assert theirs[-1] < theirs[0] * 0.95, "the reference did not train; the comparison would be vacuous"
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= tol * abs(b), (ours, theirs)


def pair(peft_cfg, name: str, seed: int = 1, **options):
    """(tunesmith model, peft model) on copies of one tiny llama."""
    base = tiny(seed=seed, vocab_size=VOCAB)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    model = tunesmith.apply(copy.deepcopy(base), name, **options)
    return base, model, pm


# -- rsLoRA ---------------------------------------------------------------------------------------
def _rslora():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_TARGETS)
    base, model, pm = pair(cfg, "lora", r=4, alpha=8, use_rslora=True)
    perturb_peft(pm)
    copy_from_peft(model, pm)
    return base, model, pm


def test_rslora_scaling_and_peft_parity():
    _, model, pm = _rslora()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    assert_parity(model, pm)


def test_rslora_training_curve_matches_peft():
    _, model, pm = _rslora()
    assert_curves_match(train_curve(model), train_curve(pm))


# -- PiSSA ----------------------------------------------------------------------------------------
def _pissa(**extra):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=LLAMA_TARGETS, **extra)
    return pair(cfg, "lora", r=4, alpha=8, init="pissa", **{k: v for k, v in extra.items() if k == "use_rslora"})


def test_pissa_init_matches_peft():
    base, model, pm = _pissa()
    name = "model.layers.0.mlp.down_proj"
    ours, theirs = model.get_submodule(name), pm.base_model.model.get_submodule(name)
    w = base.get_submodule(name).weight
    # A, B are the principal singular directions: B A carries the top-r part of W
    assert rel_err(ours.base_layer.weight, theirs.base_layer.weight) < 1e-6
    assert rel_err(ours.lora_B.weight @ ours.lora_A.weight * ours.scaling + ours.base_layer.weight, w) < 1e-6
    s = torch.linalg.svdvals(w)
    assert torch.linalg.svdvals(ours.base_layer.weight)[0] == pytest.approx(float(s[4]), rel=1e-4)
    assert_parity(model, pm)


def test_pissa_training_curve_matches_peft():
    _, model, pm = _pissa(use_rslora=True)
    assert_curves_match(train_curve(model), train_curve(pm))


def test_pissa_disabled_is_original_base():
    base, model, _ = _pissa()
    x = batch()
    with disable_adapters(model), torch.no_grad():
        assert rel_err(model(input_ids=x).logits, base(input_ids=x).logits) < 1e-5


def test_pissa_saves_peft_converted_adapter(tmp_path):
    """Saved as peft's path_initial_model_for_weight_conversion does: a rank-2r LoRA on the original W."""
    base, model, pm = _pissa()
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "pissa_init")
    perturb_peft(pm)
    copy_from_peft(model, pm)
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    path = registry.attached(model).save(model, tmp_path, "base")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    from safetensors.torch import load_file
    ours, theirs = load_file(path / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    for k in ours:
        assert rel_err(ours[k], theirs[k]) < 1e-6, k
    # peft loads it on the original base and computes what the trained PiSSA model computes
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    x = batch()
    model.eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=x).logits, model(input_ids=x).logits) < 1e-5


def test_loads_unconverted_peft_pissa_adapter(tmp_path):
    """An adapter saved by peft without conversion is re-initialised (SVD) on load, as peft does."""
    base, _, pm = _pissa()
    perturb_peft(pm)
    pm.save_pretrained(tmp_path / "a")
    loaded = Lora.load_artifact(copy.deepcopy(base), tmp_path / "a")
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.up_proj"), PissaLinear)
    x = batch()
    pm.eval()
    with torch.no_grad():
        assert rel_err(loaded.eval()(input_ids=x).logits, pm(input_ids=x).logits) < 1e-5


def test_randomised_pissa_adapter_is_refused(tmp_path):
    base = tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"))
    pm.save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match="pissa_niter_2"):
        Lora.load_artifact(copy.deepcopy(base), tmp_path / "a")


# -- init schemes, LoRA+, counts ------------------------------------------------------------------
@pytest.mark.parametrize("init,std", [("gaussian", 1 / 16), ("zero_b", 1 / math.sqrt(256))])
def test_gaussian_inits(init, std):
    layer = LoraLinear(torch.nn.Linear(256, 256), r=16, alpha=16, dropout=0.0)
    torch.manual_seed(0)
    layer.reset(init)
    assert layer.lora_A.weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.lora_B.weight.abs().sum() == 0


def test_kaiming_init_is_peft_default():
    layer = LoraLinear(torch.nn.Linear(256, 64), r=8, alpha=16, dropout=0.0)
    layer.reset("kaiming")
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) on fan_in 256
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.9 * bound
    assert layer.lora_B.weight.abs().sum() == 0


def test_lora_plus_gives_b_a_larger_lr():
    model = tunesmith.apply(tiny("qwen2"), "lora", r=4, lr_ratio_b=16.0, bias="all")
    groups = registry.attached(model).param_groups(model, 1e-3, 0.1)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert lr_of[id(layer.lora_B.weight)] == (pytest.approx(1.6e-2), 0.1)
    assert lr_of[id(layer.lora_A.weight)] == (1e-3, 0.1)
    assert lr_of[id(layer.base_layer.bias)] == (1e-3, 0.0)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable


def test_lora_plus_matches_peft_loraplus_groups():
    from peft.optimizers import create_loraplus_optimizer
    _, model, pm = pair(peft.LoraConfig(r=4, target_modules=LLAMA_TARGETS), "lora", r=4, lr_ratio_b=8.0)
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0)
    names = {id(p): ours_name(n) for n, p in pm.named_parameters()}
    theirs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    ours_names = {id(p): n for n, p in model.named_parameters()}
    ours = {ours_names[id(p)]: g["lr"] for g in registry.attached(model).param_groups(model, 1e-3, 0.0)
            for p in g["params"]}
    assert ours == pytest.approx(theirs)


def test_trainable_count_closed_form():
    model = tunesmith.apply(tiny(), "lora", r=4, target_modules=["q_proj", "down_proj"], init="pissa")
    method = registry.attached(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == lora_trainable_count(model, 4, method.targets) == 2 * 4 * ((64 + 64) + (128 + 64))


def test_pissa_run_end_to_end(alpaca_file, tmp_path):
    from helpers import run_config
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "r": 4, "init": "pissa", "lr_ratio_b": 4.0})
    run_dir, metrics = api.train(cfg)
    assert metrics["train_loss_after"] < metrics["train_loss_before"]
    meta = json.loads((run_dir / "adapter" / "tunesmith.json").read_text())
    assert meta["converted_from"] == "pissa" and meta["method"]["r"] == 8
    model, _ = tunesmith.load(run_dir)
    assert all(type(layer) is LoraLinear for _, layer in tuned_layers(model))  # plain LoRA on the original base


# -- decoding with the adapter frozen into the compute dtype ------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_adapters_decode_as_the_parameters_do_and_follow_updates(dtype):
    """Under ``frozen_adapters`` a no-grad forward reads the copy of s·A and B taken on entry: the same
    logits as the parameters give (bf16: the base's dtype, A and B cast once), re-taken on the next entry
    after an update, and never used while gradients are on."""
    from tunesmith.methods.inject import frozen_adapters
    model = tunesmith.apply(tiny(seed=1, vocab_size=VOCAB).to(dtype), "lora", r=4, alpha=8)
    for m in model.modules():                      # LoRA parameters in fp32 beside the base, as training keeps them
        if isinstance(m, LoraLinear):
            m.lora_A.float(), m.lora_B.float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = batch()
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def logits():
        with torch.no_grad():
            return model(input_ids=x).logits.float()

    want = logits()
    with frozen_adapters(model):
        layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
        assert layer.frozen and layer.frozen_ab[0].dtype == dtype
        assert rel_err(logits(), want) <= tol
        with torch.no_grad():                      # an update inside the block is not seen until re-entry
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(3)
        assert rel_err(logits(), want) <= tol
        out = model(input_ids=x).logits            # with gradients on, the parameters are read
        out.float().sum().backward()
        assert layer.lora_B.weight.grad is not None
    moved = logits()
    assert rel_err(moved, want) > 10 * tol         # the update shows once the block is left ...
    address = layer.frozen_ab[0].data_ptr()
    with frozen_adapters(model):
        assert rel_err(logits(), moved) <= tol     # ... and in the next block, whose copy is re-taken
        assert layer.frozen_ab[0].data_ptr() == address   # in place: a captured CUDA graph stays valid
    assert not layer.frozen


def test_frozen_adapters_leave_layers_with_their_own_forward_alone():
    from tunesmith.methods.inject import frozen_adapters
    model = tunesmith.apply(tiny(seed=1, vocab_size=VOCAB), "dora", r=4, alpha=8)
    with frozen_adapters(model):
        assert all(getattr(m, "frozen_ab", None) is None for m in model.modules())
