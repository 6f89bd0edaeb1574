"""Why a DPO run's first loss can differ from ln 2 on the GPU: the policy's per-sequence log-probs
against the reference's, computed four ways on the same batch, at the first step (LoRA B = 0, so
all four are the same function and differ only by how the GPU computes them).

    python3 bench/gpu_dpo_first_loss.py --out $OUT/gpu_dpo_first_loss.json [--compile] [--packed]

Random-weight Llama-3-8B, LoRA r16 on the seven projections, bf16 autocast, 4 UltraFeedback pairs
(``.benchdata/ufb_pairs.npz``, bench/gpu_prepare_ufb.py). Rows: ``policy`` (gradients on, adapter on:
the policy pass), then the reference as the objective computes it (``no_grad``, adapter disabled), with
the adapter on under ``no_grad``, and with the adapter disabled but gradients on. Reported: each
variant's largest |log-prob difference| from the policy over the 8 sequences, and the DPO loss it gives.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_common import DEV, LORA, TARGETS, build_model, upcast_trainable  # noqa: E402
from gpu_dpo import pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_dpo_first_loss.json")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--packed", action="store_true")
    a = ap.parse_args()
    import tunesmith
    from tunesmith.config import TrainConfig
    from tunesmith.data import collate
    from tunesmith.data.collate import to_device
    from tunesmith.data.packing import collate_packed_pairs
    from tunesmith.methods import inject
    from tunesmith.train.objectives._preference import pair_rows
    from tunesmith.train.objectives.configs.dpo import DPOConfig
    from tunesmith.train.objectives.dpo import DPO
    examples, pad = pairs(1, 4)
    ours = [{k: ex[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
            for ex in examples]
    model = build_model("8b")
    if a.packed:
        from tunesmith.kernels import attention
        attention.enable(model)
    model = tunesmith.apply(model, "lora", target_modules=TARGETS, **LORA)
    upcast_trainable(model)
    if a.compile:
        from tunesmith.kernels.compile import compile_decoder_layers
        compile_decoder_layers(model)
    objective = DPO(DPOConfig(beta=0.1))
    objective.configure(TrainConfig(compile=a.compile, chunked_ce=True))
    batch = to_device(collate_packed_pairs(ours) if a.packed else collate(ours, pad), torch.device(DEV))
    rows, b = pair_rows(batch)

    def logps(grad: bool, adapter: bool) -> torch.Tensor:
        with torch.autocast(DEV, dtype=torch.bfloat16), torch.set_grad_enabled(grad), \
                (contextlib.nullcontext() if adapter else inject.disable_adapters(model)):
            sums, _ = objective.logps_fn(model, rows, 2 * b)
        return sums.detach().float()

    policy = logps(True, True)
    out = {"compile": a.compile, "packed": a.packed, "policy_logps": policy.tolist(), "variants": {}}
    for name, grad, adapter in (("no_grad, adapter disabled (the objective's reference)", False, False),
                                ("no_grad, adapter on", False, True),
                                ("gradients on, adapter disabled", True, False),
                                ("policy again", True, True)):
        try:
            ref = logps(grad, adapter)
        except Exception as e:   # a compile failure of one variant is reported, the others still run
            out["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:55s} {out['variants'][name]['error']}", flush=True)
            continue
        d = policy - ref
        margin = d[:b] - d[b:]
        loss = float(-F.logsigmoid(0.1 * margin).mean())
        out["variants"][name] = {"max_abs_logp_diff": float(d.abs().max()), "loss": loss,
                                 "loss_minus_ln2": loss - math.log(2)}
        print(f"{name:55s} max|Δlogp| {d.abs().max():.4f}  loss {loss:.6f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
