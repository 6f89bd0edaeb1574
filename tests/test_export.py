"""`tunesmith export --for vllm|llama.cpp|peft`: every refusal names its reason and offers
merge-then-export; every allowed path writes an adapter the target reads."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tunesmith
from tunesmith import cli
from tunesmith.errors import ConfigError
from tunesmith.export import ExportRefused, export
from tunesmith.methods import registry
from tunesmith.methods.lora import Lora

from helpers import ids, rel_err, tiny


def _adapter(tmp_path, name, arch="llama", task="causal_lm", **options):
    model = tunesmith.apply(tiny(arch, task=task), name, **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    path = registry.attached(model).save(model, tmp_path / name, "base-dir")
    return path, model


def _refusal(path, target, **kw) -> str:
    with pytest.raises(ExportRefused) as e:
        export(path, target, **kw)
    msg = str(e.value)
    assert f"tunesmith merge {path} MERGED_DIR" in msg  # always offers merge-then-export
    return msg


def test_dora_refused_by_vllm_and_llama_cpp_allowed_for_peft(tmp_path):
    path, _ = _adapter(tmp_path, "dora", r=2)
    assert "DoRA" in _refusal(path, "vllm") and "lora_magnitude_vector" in _refusal(path, "vllm")
    assert "vllm serve MERGED_DIR" in _refusal(path, "vllm")
    assert "convert_hf_to_gguf.py MERGED_DIR" in _refusal(path, "llama.cpp")
    res = export(path, "peft", out=tmp_path / "out")
    cfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] and (res.out_dir / "adapter_model.safetensors").is_file()


def test_rslora_refused_by_llama_cpp_unless_folded(tmp_path):
    path, model = _adapter(tmp_path, "lora", r=4, alpha=8, use_rslora=True)
    assert "alpha/√r" in _refusal(path, "llama.cpp")
    export(path, "vllm", out=tmp_path / "vllm")  # vLLM applies use_rslora itself
    res = export(path, "llama.cpp", out=tmp_path / "gguf", fold_rslora=True)
    cfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == pytest.approx(8 * math.sqrt(4))
    assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(8 / math.sqrt(4))  # llama.cpp's alpha/r: the same scale
    folded = Lora.load_artifact(tiny(), res.out_dir)
    x = ids()
    with torch.no_grad():
        assert rel_err(folded(input_ids=x).logits, model(input_ids=x).logits) < 1e-6
    assert any("convert_lora_to_gguf.py" in n and "--base base-dir" in n for n in res.notes)


def test_modules_to_save_refused_by_vllm_and_llama_cpp(tmp_path):
    path, _ = _adapter(tmp_path, "lora", arch="bert", task="classification", r=2)
    for target in ("vllm", "llama.cpp"):
        msg = _refusal(path, target)
        assert "modules_to_save (classifier)" in msg
    export(path, "peft", out=tmp_path / "peft")


def test_bias_and_adalora_refused_by_vllm(tmp_path):
    path, _ = _adapter(tmp_path, "lora", arch="qwen2", r=2, bias="lora_only")
    assert "bias tensors" in _refusal(path, "vllm")
    path, _ = _adapter(tmp_path, "adalora", init_r=2, target_r=1, total_steps=5)
    msg = _refusal(path, "vllm")
    assert "peft_type is 'ADALORA'" in msg and "modules_to_save" not in msg
    export(path, "peft", out=tmp_path / "peft")


def test_plain_lora_goes_everywhere(tmp_path):
    path, _ = _adapter(tmp_path, "lora", r=4)
    res = export(path, "vllm", out=tmp_path / "v")
    assert any("vllm serve base-dir --enable-lora --max-lora-rank 8" in n for n in res.notes)
    assert set(p.name for p in res.out_dir.iterdir()) >= {"adapter_config.json", "adapter_model.safetensors"}
    res = export(path, "llama.cpp", out=tmp_path / "l")
    assert any("convert_lora_to_gguf.py" in n for n in res.notes)


def test_cli_refusal_and_success(tmp_path, capsys):
    path, _ = _adapter(tmp_path, "dora", r=2)
    assert cli.main(["export", str(path), "--for", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vllm cannot load") and "tunesmith merge" in err
    assert cli.main(["export", str(path), "--for", "peft", "--out", str(tmp_path / "o")]) == 0
    assert "peft adapter written to" in capsys.readouterr().out
    assert cli.main(["export", str(path), "--for", "peft", "--out", str(tmp_path / "o")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_other_artifacts(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("method: {name: full}\n")
    (run / "model" / "config.json").write_text("{}")
    with pytest.raises(ExportRefused, match="already a full transformers model directory"):
        export(run, "vllm")
    delta = tmp_path / "delta"
    delta.mkdir()
    (delta / "delta_config.json").write_text("{}")
    assert "tunesmith delta" in _refusal(delta, "peft")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text(json.dumps({"peft_type": None}))
    assert "tunesmith-only format" in _refusal(odd, "peft")


def test_rank_only_for_dylora(tmp_path):
    path, _ = _adapter(tmp_path, "lora", r=2)
    with pytest.raises(ConfigError, match="only DyLoRA runs"):
        export(path, "peft", rank=1, out=tmp_path / "o")
    path, model = _adapter(tmp_path, "dylora", r_max=4)
    res = export(path, "vllm", rank=3, out=tmp_path / "d")
    assert json.loads((res.out_dir / "adapter_config.json").read_text())["r"] == 3
    assert not list(tmp_path.glob("*rank-tmp*"))


def test_vllm_command_for_several_runs_and_embedding_refusal(tmp_path, capsys):
    a, _ = _adapter(tmp_path / "one", "lora", r=4)
    b, _ = _adapter(tmp_path / "two", "lora", r=16, target_modules=["q_proj"])
    assert cli.main(["export", str(a), str(b), "--for", "vllm"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"serve with: vllm serve base-dir --enable-lora --max-lora-rank 16 --max-loras 2 --lora-modules "
                    f"lora={(a.parent / 'export-vllm').resolve()} lora-1={(b.parent / 'export-vllm').resolve()}")
    assert cli.main(["export", str(a), str(b), "--for", "peft"]) == 2
    emb, _ = _adapter(tmp_path / "emb", "lora", r=2, target_modules=["q_proj", "lm_head"])
    assert "embedding or output layer (lm_head)" in _refusal(emb, "vllm")
