"""Delta checkpoints: dense and sparse entries, exact round trip, size, format errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tunesmith.errors import ConfigError
from tunesmith.methods import delta

from helpers import tiny


def _changed_copy(model, frac: float, seed: int = 0):
    """A copy of ``model`` whose largest tensors changed at a random ``frac`` of their entries."""
    import copy
    g = torch.Generator().manual_seed(seed)
    trained = copy.deepcopy(model)
    masks = {}
    with torch.no_grad():
        for n, p in trained.named_parameters():
            idx = torch.randperm(p.numel(), generator=g)[: max(1, int(frac * p.numel()))]
            p.view(-1)[idx] += torch.randn(idx.numel(), generator=g)
            masks[n] = idx.sort().values
    return trained, masks


def test_pack_picks_the_smaller_form():
    small = torch.randn(64)
    assert delta.pack(small, torch.tensor([1])) is small                         # small tensors stay dense
    big = torch.randn(100, 100)
    entry = delta.pack(big, torch.arange(0, 10_000, 100))
    assert isinstance(entry, delta.Sparse) and entry.indices.dtype == torch.int32
    assert torch.equal(entry.values, big.view(-1)[::100])
    assert delta.pack(big, torch.arange(6000)) is big                             # 60%: sparse is larger
    assert delta.pack(big, None) is big


def test_sparse_round_trip_is_exact_and_small(tmp_path):
    base = tiny("llama", seed=3)
    trained, masks = _changed_copy(base, 0.005)
    entries = {n: delta.pack(p.detach(), masks[n]) for n, p in trained.named_parameters()}
    path = delta.write_delta(tmp_path / "delta", entries, base="random:llama", method={"name": "fishmask"})
    cfg = delta.read_config(path)
    kinds = {n: s["kind"] for n, s in cfg["tensors"].items()}
    assert cfg["version"] == 2 and cfg["stats"]["sparse_tensors"] == sum(k == "sparse" for k in kinds.values())
    assert kinds["model.embed_tokens.weight"] == "sparse" and kinds["model.layers.0.mlp.up_proj.weight"] == "sparse"
    assert kinds["model.norm.weight"] == "dense"                                  # 64 entries
    fresh = tiny("llama", seed=3)
    delta.apply_delta(fresh, path)
    for (n, a), b in zip(fresh.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), n                                               # bit for bit
    total = sum(p.numel() for p in base.parameters())
    # 0.5% of the entries at 4 bytes of value + 4 bytes of index (+ dense norms, headers)
    expected = 0.005 * total * (4 + 4)
    assert expected < delta.size_bytes(path) < 1.1 * expected + 64 * 4 * 5 + 256 * len(kinds)


def test_version1_dense_delta_still_loads(tmp_path):
    base = tiny("llama", seed=3)
    w = torch.randn_like(base.model.norm.weight)
    d = tmp_path / "v1"
    d.mkdir()
    save_file({"model.norm.weight": w}, str(d / delta.WEIGHTS_NAME))
    (d / delta.CONFIG_NAME).write_text(json.dumps({"format": "tunesmith-delta", "version": 1, "method": {},
                                                   "tensors": {"model.norm.weight": {"kind": "dense"}}}))
    delta.apply_delta(base, d)
    assert torch.equal(base.model.norm.weight, w)


def test_delta_errors_name_the_tensor(tmp_path):
    base = tiny("llama", seed=3)
    path = delta.write_delta(tmp_path / "d", {"model.norm.weight": torch.zeros(3)}, base="b", method={})
    with pytest.raises(ConfigError, match=r"model.norm.weight has shape \[3\].*\[64\]"):
        delta.apply_delta(base, path)
    path = delta.write_delta(tmp_path / "e", {"nope.weight": torch.zeros(3)}, base="b", method={})
    with pytest.raises(ConfigError, match="nope.weight is not a parameter"):
        delta.apply_delta(base, path)
    with pytest.raises(ConfigError, match="not a tunesmith delta"):
        delta.read_config(tmp_path)
