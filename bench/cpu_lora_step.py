"""One LoRA training step on SmolLM2-135M (batch 4 x 256 tokens), tunesmith vs HF peft, same process.

Both wrap deep copies of the same base with LoRA r=8, alpha=16 on all seven linear projections,
and run forward + cross-entropy + backward + AdamW step on the same tokens. Steps alternate
between the two so that machine noise hits both alike; the median of each is reported.

    python bench/cpu_lora_step.py [--steps 6] [--out bench/results/cpu_lora_step.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_models():
    import peft
    import tunesmith
    from tunesmith.models.loader import ModelConfig, load_model
    base = load_model(ModelConfig(name_or_path="smollm2-135m", device="cpu", dtype="float32"))
    ours = tunesmith.apply(copy.deepcopy(base), "lora", r=8, alpha=16, target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    return ours, theirs


def step(model, opt, x) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one training step."""
    t0, c0 = time.perf_counter(), time.process_time()
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (after one warm-up each)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="bench/results/cpu_lora_step.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    ours, theirs = make_models()
    x = torch.randint(0, 49152, (args.batch, args.seq))
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in (("tunesmith", ours), ("peft", theirs))}
    models = {"tunesmith": ours, "peft": theirs}
    first_loss = {name: step(models[name], opts[name], x)[2] for name in models}  # warm-up, same start
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.steps):
        order = ("tunesmith", "peft") if i % 2 == 0 else ("peft", "tunesmith")
        for name in order:
            wall, proc, _ = step(models[name], opts[name], x)
            times[name].append(wall)
            cpu[name].append(proc)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    tokens = args.batch * args.seq
    result = {
        "what": "one LoRA step, SmolLM2-135M, r=8 on 7 linear projections", "batch": args.batch, "seq": args.seq,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "first_loss": first_loss, "step_s": times, "median_step_s": med,
        "cpu_s": cpu, "median_cpu_s": med_cpu, "cpu_ratio_vs_peft": med_cpu["peft"] / med_cpu["tunesmith"],
        "tokens_per_s": {n: tokens / s for n, s in med.items()}, "speedup_vs_peft": med["peft"] / med["tunesmith"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"first-step loss  tunesmith {first_loss['tunesmith']:.4f}  peft {first_loss['peft']:.4f}")
    for name in models:
        print(f"{name:<10} median step {med[name]:.3f} s wall, {med_cpu[name]:.3f} s CPU "
              f"({tokens / med[name]:.0f} tokens/s)")
    print(f"tunesmith / peft speed ratio: {result['speedup_vs_peft']:.3f}x wall, "
          f"{result['cpu_ratio_vs_peft']:.3f}x CPU time")


if __name__ == "__main__":
    main()
