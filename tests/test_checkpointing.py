"""Activation checkpointing as ``train.*`` fields: selective (``checkpoint_layers``) and offloaded
(``offload_activations``). Checkpointing changes where activations live, never the gradients."""
from __future__ import annotations

import gc
import json

import pytest
import torch

import tunesmith
from helpers import ids, run_config, tiny
from tunesmith.config import ConfigError
from tunesmith.kernels import offload as offload_mod
from tunesmith.models.targets import find_blocks
from tunesmith.train import accel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _lora_model(layers: int = 4, method: str = "lora", options: dict | None = None, **kw):
    opts = {} if method == "full" else {"r": 4, "target_modules": "all-linear"}
    model = tunesmith.apply(tiny(num_hidden_layers=layers, **kw), method, **opts, **(options or {}))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # B = 0 at init would leave A's gradient zero
    return model.train()


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_block_runs(model) -> list[int]:
    """Calls of each block's MLP (recomputation calls it again; the block's own hooks sit outside)."""
    counts = [0] * len(find_blocks(model)[1])
    for i, block in enumerate(find_blocks(model)[1]):
        block.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_selective_checkpointing_recomputes_only_the_chosen_blocks():
    batch = ids(2, 16)
    ref = _grads(_lora_model(), batch)
    model = _lora_model()
    chosen = accel.enable_checkpointing(model, layers=2)
    assert chosen == [False, True, False, True]           # spread evenly over the 4 blocks
    counts = _count_block_runs(model)
    got = _grads(model, batch)
    assert counts == [1, 2, 1, 2]                          # only the chosen blocks ran twice
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)

    full = _lora_model()
    assert accel.enable_checkpointing(full) == [True] * 4
    counts = _count_block_runs(full)
    _grads(full, batch)
    assert counts == [2, 2, 2, 2]


def test_offload_hooks_see_exactly_the_checkpointed_blocks_inputs(monkeypatch):
    """The offload hooks wrap only the checkpoint's own saves: one tensor per checkpointed block, its
    input hidden states (not the rotary tables every block shares, not the block's internals)."""
    seen = []

    class Spy(offload_mod.ActivationOffload):
        def eligible(self, t):  # the real rule without its CUDA check
            return t.is_floating_point() and t.requires_grad and t.numel() * t.element_size() >= 1024

        def pack(self, t):
            if self.eligible(t):
                seen.append(tuple(t.shape))
            return t

        def unpack(self, t):
            return t

    monkeypatch.setattr(accel, "ActivationOffload", Spy)
    batch = ids(2, 16)
    ref = _grads(_lora_model(), batch)
    model = _lora_model()
    accel.enable_checkpointing(model, layers=2, offload=True, kept_on_gpu=0)   # blocks 1 and 3 checkpointed
    got = _grads(model, batch)
    assert seen == [(2, 16, 64), (2, 16, 64)]              # blocks 1 and 3: their inputs, nothing else
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


def _records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_checkpoint_layers_through_a_run(alpaca_file, tmp_path):
    method = {"name": "lora", "r": 4}
    plain, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "a", method, max_steps=2))
    part, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "b", method, max_steps=2,
                                         gradient_checkpointing=True, checkpoint_layers=1))
    for x, y in zip(_records(part), _records(plain), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"])


@pytest.mark.parametrize("train, message", [
    ({"gradient_checkpointing": False, "checkpoint_layers": 1}, "train.checkpoint_layers: applies to checkpointed layers"),
    ({"gradient_checkpointing": False, "offload_activations": True},
     "train.offload_activations: applies to checkpointed layers"),
    ({"offload_activations": True}, "model is on cpu"),   # implies gradient_checkpointing
    ({"gradient_checkpointing": True, "offload_activations": True}, "model is on cpu"),
    ({"gradient_checkpointing": True, "checkpoint_layers": 3}, r"3 is not between 1 and the 2 transformer blocks"),
    ({"gradient_checkpointing": True, "checkpoint_layers": 0}, "train.checkpoint_layers: 0 recomputes no block"),
    ({"checkpoint_layers": 0, "offload_activations": True, "compile": False},
     "train.checkpoint_layers: 0 recomputes no block"),
    ({"checkpoint_layers": 0, "offload_activations": True}, "model is on cpu"),
    ({"gradient_checkpointing": True, "offload_activations": False, "offload_kept_layers": 2},
     "train.offload_kept_layers: applies to offloaded"),
    ({"offload_kept_layers": 2}, "model is on cpu"),   # implies offload_activations
    ({"gradient_checkpointing": True, "offload_activations": True, "offload_kept_layers": -1},
     "train.offload_kept_layers"),
])
def test_impossible_checkpointing_settings_are_refused(train, message, alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tunesmith.train(run_config(alpaca_file, tmp_path, {"name": "lora"}, **train))
    assert not (tmp_path / "run").exists()                 # nothing half-written


# -- on a GPU: the real copies --------------------------------------------------------------------
def _gpu_model():
    return _lora_model(layers=4, hidden_size=256, intermediate_size=512).cuda()


def _held_after_forward(model, batch) -> int:
    """GPU memory the forward leaves held for backward (then runs the backward)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = model(input_ids=batch, labels=batch).loss
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    return held


@cuda
def test_offload_frees_the_block_inputs_and_keeps_the_gradients_bitwise():
    """Against plain checkpointing and against torch's save_on_cpu (the reference placement)."""
    batch = ids(4, 512).cuda()
    ref_model = _gpu_model()
    accel.enable_checkpointing(ref_model)
    ref = _grads(ref_model, batch)

    held_plain = _held_after_forward(ref_model, batch)
    model = _gpu_model()
    made = []
    real = accel.ActivationOffload

    class Kept(real):
        def __init__(self, **kw):
            super().__init__(**kw)
            made.append(self)
    accel.ActivationOffload = Kept
    try:
        accel.enable_checkpointing(model, offload=True)
    finally:
        accel.ActivationOffload = real
    _held_after_forward(model, batch)
    buffers = made[0].pool.made
    held_off = _held_after_forward(model, batch)
    assert 3 <= buffers <= 4 and made[0].pool.made == buffers   # the second step reuses the first's buffers
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    hidden = 4 * 512 * 256 * 4                               # one block input, fp32
    assert held_plain - held_off >= 0.9 * 3 * hidden         # blocks 1-3 at least (block 0's input may need no grad)

    save_on_cpu = _gpu_model()
    accel.enable_checkpointing(save_on_cpu)
    for block in find_blocks(save_on_cpu)[1]:
        block._gradient_checkpointing_func = offload_mod.offloading(block._gradient_checkpointing_func, None)
    theirs = _grads(save_on_cpu, batch)
    for n in ref:
        assert torch.equal(theirs[n], ref[n]), n


@cuda
def test_host_buffers_are_unregistered_when_their_pool_dies():
    """Otherwise the host allocator hands the same addresses out again while CUDA still has them
    page-locked, and the next registration there fails ("resource already mapped")."""
    pool = offload_mod._HostPool()
    t = pool.take((4096,), (1,), torch.float32)
    assert t.is_pinned()                                                    # page-locked
    pool.give(t)
    assert pool.take((4096,), (1,), torch.float32) is t and pool.made == 1     # reused, not made again
    del pool
    gc.collect()
    assert not t.is_pinned()                                                # unregistered with its pool


@cuda
def test_offload_of_compiled_blocks_keeps_the_gradients_bitwise_and_frees_their_products():
    """With train.compile, a block outside checkpoint_layers keeps its products in host memory: the
    same compiled kernels run, so the gradients are bitwise those without offload, and the GPU holds
    less after forward. The second step reuses the first's host buffers."""
    from tunesmith.kernels.compile import compile_decoder_layers
    batch = ids(4, 512).cuda()

    def build(offload: bool):
        torch._dynamo.reset()
        model = _gpu_model()
        accel.enable_checkpointing(model, layers=2, offload=offload)
        compile_decoder_layers(model)
        return model

    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = build(False)
        _held_after_forward(plain, batch)                # compiles
        held_plain = _held_after_forward(plain, batch)
        ref = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
        model = build(True)
        off = find_blocks(model)[1][0].activation_offload
        _held_after_forward(model, batch)
        made = off.pool.made
        held_off = _held_after_forward(model, batch)
    # block 0's products went out (block 2, the last kept block, keeps them), with the checkpointed
    # blocks' inputs; the second step reused the first's buffers
    assert made > 4 and off.pool.made == made
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    mlp = 4 * 512 * 512 * 2                             # one MLP product, bf16
    assert held_plain - held_off >= 4 * mlp             # block 0's gate, up and their product, and more


def test_only_tensors_whose_layout_can_round_trip_are_offloaded():
    """A compiled block's backward checks the strides of what it saved: a host copy keeps the
    tensor's strides, which needs a dense layout; others (slices with gaps) stay on the GPU."""
    x = torch.randn(2, 3, 4, 5)
    assert offload_mod._dense(x) and offload_mod._dense(x.transpose(1, 2)) and offload_mod._dense(x.permute(3, 0, 2, 1))
    assert not offload_mod._dense(x[:, :2]) and not offload_mod._dense(x[..., ::2])


def test_offload_leaves_the_last_kept_block_on_the_gpu():
    """Compiled blocks offload what they keep, except the last block outside checkpoint_layers:
    backward reaches it first, before its products could come back from the host."""
    model = _lora_model()
    chosen = accel.enable_checkpointing(model, layers=2, offload=True)
    assert chosen == [True, False, True, False]            # the spread ends on the kept block
    carriers = [getattr(b, "activation_offload", None) is not None for b in find_blocks(model)[1]]
    assert carriers == [True, True, True, False]
    model = _lora_model()
    chosen = accel.enable_checkpointing(model, layers=2, offload=True, kept_on_gpu=0)
    assert chosen == [False, True, False, True]            # nothing kept: the plain spread
    assert all(getattr(b, "activation_offload", None) is not None for b in find_blocks(model)[1])
    model = _lora_model()
    accel.enable_checkpointing(model, layers=2, offload=True, kept_on_gpu=2)   # both blocks outside it
    assert [getattr(b, "activation_offload", None) is not None for b in find_blocks(model)[1]] == [True, False, True, False]
    model = _lora_model()
    accel.enable_checkpointing(model, layers=2, offload=True, kept_on_gpu=5)   # more than there are
    assert [getattr(b, "activation_offload", None) is not None for b in find_blocks(model)[1]] == [True, False, True, False]
    model = _lora_model()
    chosen = accel.enable_checkpointing(model, layers=0, offload=True)    # none recomputes: all offload but one
    assert chosen == [False] * 4
    assert [getattr(b, "activation_offload", None) is not None for b in find_blocks(model)[1]] == [True, True, True, False]
    with pytest.raises(ConfigError, match=r"checkpoint_layers: 0 is not between 1 and the 4"):
        accel.enable_checkpointing(_lora_model(), layers=0)
    chosen = accel.enable_checkpointing(_lora_model(layers=32), layers=12, offload=True, kept_on_gpu=4)
    assert sum(chosen) == 12 and chosen[-3:] == [True, False, False] and chosen[0]


def test_offload_kept_layers_reaches_the_blocks(monkeypatch):
    """train.offload_kept_layers is what enable_checkpointing keeps on the GPU (1 when unset)."""
    from tunesmith.config import TrainConfig
    seen = []
    monkeypatch.setattr(accel, "enable_checkpointing", lambda model, layers, offload, kept_on_gpu: seen.append(
        (layers, offload, kept_on_gpu)))
    for kept in (None, 0, 4):
        accel.after_method(None, TrainConfig(gradient_checkpointing=True, checkpoint_layers=12,
                                             offload_activations=True, offload_kept_layers=kept))
    assert seen == [(12, True, 1), (12, True, 0), (12, True, 4)]


def test_checkpointing_leaves_the_embeddings_output_without_grad():
    """Non-reentrant checkpointing needs no input that requires grad; transformers' hook that makes
    the embeddings' output require it is removed, so no step computes the first block's input
    gradient, and the gradients of the trained weights are unchanged."""
    batch = ids(2, 16)
    ref_model = _lora_model(layers=2)
    ref = _grads(ref_model, batch)
    model = _lora_model(layers=2)
    accel.enable_checkpointing(model)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out))
    got = _grads(model, batch)
    assert seen and not seen[0].requires_grad and seen[0].grad is None
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
