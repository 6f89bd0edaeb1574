"""Long context: the longest sequence at which 8B QLoRA trains at batch 1 in 80 GB of GPU memory, for
HF+peft (long-hf), tunesmith (long-ts, with Liger) and tunesmith with the checkpointed layers' inputs
offloaded to host memory (long-tsoff, train.offload_activations). On a larger GPU the process is
capped at 80 GB (``set_per_process_memory_fraction``), so the answer is the same kind of number.

Peak memory is linear in the sequence length once attention is flash/varlen and the loss is
chunked, so the search measures one training step at three short lengths, fits the line through
the last two, predicts the longest length that fits (total GPU memory less 1 GiB), and then runs
one real step there (capped by --long-cap to keep within the device budget), backing off on OOM.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import gpu_common as G


def _step(model, loss_fn, seq: int, vocab: int) -> tuple[float, float]:
    G.free()
    batch = G.random_batches(vocab, 1, seq, n=1)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del loss, batch, opt
    return torch.cuda.max_memory_allocated() / 2**30, dt


def worker(group: str, cap: int, out: Path) -> None:
    from tunesmith.methods import registry
    side = group.split("-")[1]
    method = "qlora" if side == "hf" or "qlora" in registry.all_methods() else "lora"
    if side.startswith("ts"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(fused_linear_cross_entropy=False)
    total = torch.cuda.mem_get_info()[1]
    card = 80 * 10**9  # an 80 GB card
    if total > card:
        torch.cuda.set_per_process_memory_fraction(card / total)
    model = G.build_model("8b")
    if side == "hf":
        model, loss_fn = G.setup_hf(model, method, True)
    else:
        model, loss_fn = G.setup_tunesmith(model, method, True, liger=True, offload=side == "tsoff")
    vocab = model.config.vocab_size
    budget = min(total, card) / 2**30 - 1.0
    res = {"key": f"long-{side}", "impl": side, "method": method, "budget_gib": budget, "points": [],
           "device": torch.cuda.get_device_name(0), "capped_to_80GB": total > card}
    try:
        for seq in (4096, 8192, 16384):
            peak, dt = _step(model, loss_fn, seq, vocab)
            res["points"].append([seq, peak, dt])
            print("LONGPOINT", side, seq, f"{peak:.2f} GiB {dt:.1f}s", flush=True)
        (s1, m1, _), (s2, m2, _) = res["points"][-2:]
        slope = (m2 - m1) / (s2 - s1)
        pred = int(s2 + (budget - m2) / slope) // 1024 * 1024
        res.update(gib_per_1k_tokens=slope * 1024, predicted_max=pred)
        seq = min(pred, cap)
        for _ in range(4):
            try:
                peak, dt = _step(model, loss_fn, seq, vocab)
                res.update(verified=seq, verified_peak_gib=peak, verified_step_s=dt)
                print("LONGVERIFY", side, seq, f"{peak:.2f} GiB {dt:.1f}s", flush=True)
                break
            except torch.OutOfMemoryError:
                res.setdefault("oom_at", []).append(seq)
                seq = int(seq * 0.9) // 1024 * 1024
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out.write_text(json.dumps([res]))
