"""DPO throughput and memory: tunesmith against TRL's DPOTrainer (+ peft), one call.

    python bench/gpu_prepare_ufb.py                    # here, once: .benchdata/ufb_pairs.npz
    python bench/gpu_dpo.py --out $OUT/gpu_dpo.json [--batches 2,4] [--sides trl,ts,ts+packed] [--profile ts+packed]

Both sides train LoRA r16 (alpha 32) on all seven projections of a random-weight Llama-3-8B
architecture (bf16 weights, fp32 adapter weights, bf16 autocast), with non-reentrant gradient
checkpointing, fused AdamW at lr 5e-6, clipping at 1.0, DPO sigmoid with beta 0.1, and the reference
policy as the same weights with the adapter disabled. The batches are real UltraFeedback pairs
(``train_prefs``, tokenized by tunesmith's preference path with the chat template, 1024 tokens at
most a side); both sides see the same pairs in the same order. TRL gets them already tokenized
(``_prepare_dataset`` is skipped: this times training, not tokenization) and otherwise runs its
defaults. Sides:

* ``trl``: ``DPOTrainer`` with ``peft_config``, ``gradient_checkpointing=True``, ``bf16=True``.
* ``ts``: tunesmith's DPO objective (chunked per-sequence log-probs, the fused LoRA op) on padded
  pair batches; ``ts+compile`` with compiled decoder layers.
* ``ts+packed``: the same pairs padding-free (``train.padding_free``: each pair's chosen and rejected
  as documents of one row, varlen attention), ``ts+packed+compile`` compiled.
* ``+auto`` (``ts+auto``, ``ts+packed+auto``): compile and checkpointing left to ``train.speed: auto``
  (the default of a run) instead of set by hand, planned as a run with ``max_seq_len`` 1,024 plans
  (``accel.step_tokens``); ``+limit16GiB``
  adds ``train.memory_limit: 16GiB``. The JSON row says what it chose and why.

Each run is its own process. Reported per run: pairs/s and real (non-pad) tokens/s over the timed
steps (median step time after warm-up), peak GiB allocated, and the first step's loss.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import torch

from gpu_common import DEV, LORA, TARGETS, build_model, peak_gib, sync, upcast_trainable

DATA = Path(".benchdata/ufb_pairs.npz")
LR, BETA = 5e-6, 0.1
MAX_LEN = 1024       # tokens a side at most (gpu_prepare_ufb.py)


def pairs(n_steps: int, batch: int) -> tuple[list[dict], int]:
    """The first n_steps*batch pairs as {prompt_ids, chosen_ids, rejected_ids, chosen_labels, ...}."""
    z = np.load(DATA)
    out = []
    n = len(z["chosen_offsets"]) - 1
    for i in range(n_steps * batch):
        j = i % n
        ex = {}
        for side in ("chosen", "rejected"):
            a, b = z[f"{side}_offsets"][j], z[f"{side}_offsets"][j + 1]
            ids, keep = z[f"{side}_ids"][a:b].astype(np.int64).tolist(), z[f"{side}_keep"][a:b].tolist()
            ex[f"{side}_input_ids"] = ids
            ex[f"{side}_labels"] = [t if k else -100 for t, k in zip(ids, keep)]
        p = next(i for i, k in enumerate(z["chosen_keep"][z["chosen_offsets"][j]:]) if k)   # prompt length
        ex["prompt_ids"] = ex["chosen_input_ids"][:p]
        ex["chosen_ids"], ex["rejected_ids"] = ex["chosen_input_ids"][p:], ex["rejected_input_ids"][p:]
        if os.environ.get("BENCH_TINY"):   # tiny vocabulary: fold the ids into it
            for k in list(ex):
                ex[k] = [t % 512 if t >= 0 else t for t in ex[k]]
        out.append(ex)
    return out, int(z["pad_id"]) % (512 if os.environ.get("BENCH_TINY") else 1 << 62)


def real_tokens(examples: list[dict]) -> int:
    return sum(len(ex["chosen_input_ids"]) + len(ex["rejected_input_ids"]) for ex in examples)


def run_trl(batch: int, steps: int, warmup: int) -> dict:
    import datasets
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    examples, pad = pairs(steps + warmup, batch)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": pad, "<eos>": pad + 1},
                                                                              unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter() - marks["t"])

    rows = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in examples]
    args = DPOConfig(output_dir="/tmp/trl_dpo", per_device_train_batch_size=batch, max_steps=steps + warmup,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     optim="adamw_torch_fused", max_grad_norm=1.0, beta=BETA, max_length=None,
                     gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                     bf16=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                     use_cpu=DEV == "cpu", dataloader_num_workers=0)
    model = build_model("8b")
    trainer = Pretokenized(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tok, callbacks=[Clock()],
                           peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                  target_modules=TARGETS, task_type="CAUSAL_LM"))
    # the same pairs in the same order as tunesmith's side (no shuffling)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    torch.cuda.reset_peak_memory_stats() if DEV == "cuda" else None
    trainer.train()
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return summarize(times[warmup:], examples[warmup * batch:], batch, first)


def run_ts(batch: int, steps: int, warmup: int, packed: bool, compiled: bool, auto: bool = False,
           memory_limit: str | None = None, profile_to: Path | None = None) -> dict:
    import tunesmith
    from tunesmith.config import TrainConfig
    from tunesmith.data import collate
    from tunesmith.data.collate import to_device
    from tunesmith.data.packing import collate_packed_pairs
    from tunesmith.train.accel import enable_checkpointing
    from tunesmith.train.objectives.configs.dpo import DPOConfig
    from tunesmith.train.objectives.dpo import DPO

    examples, pad = pairs(steps + warmup, batch)
    ours = [{k: ex[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
            for ex in examples]
    model = build_model("8b")
    if packed:
        from tunesmith.kernels import attention
        attention.enable(model)
    model = tunesmith.apply(model, "lora", target_modules=TARGETS, **LORA)
    upcast_trainable(model)
    objective = DPO(DPOConfig(beta=BETA))
    speed_report = None
    if auto:   # train.speed: auto chooses compile and checkpointing, as a run with the default settings does
        from tunesmith.methods import registry
        from tunesmith.train import accel, speed
        tc = TrainConfig(batch_size=batch, max_seq_len=MAX_LEN, padding_free=packed, memory_limit=memory_limit,
                         chunked_ce=True)
        tc, report = speed.resolve(tc, model, registry.get("lora"), torch.device(DEV), accel.step_tokens(tc, objective))
        speed_report = {"chosen": report.chosen, "reason": report.reason}
        print("speed: auto:", speed_report, flush=True)
        accel.after_method(model, tc)
        compiled = bool(tc.compile)
    else:
        tc = TrainConfig(compile=compiled, chunked_ce=True)
        enable_checkpointing(model)
        if compiled:
            from tunesmith.kernels.compile import compile_decoder_layers
            compile_decoder_layers(model)
    objective.configure(tc)
    objective.prepare(model, None, [], run=None)     # the reference: the adapter disabled
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                            fused=DEV == "cuda")
    device = torch.device(DEV)
    times, first = [], None
    torch.cuda.reset_peak_memory_stats() if DEV == "cuda" else None
    for s in range(steps + warmup):
        chunk = ours[s * batch:(s + 1) * batch]
        b = to_device(collate_packed_pairs(chunk) if packed else collate(chunk, pad), device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss_sum, n, _ = objective.loss(model, b)
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        if first is None:
            first = loss.item()
    out = summarize(times[warmup:], examples[warmup * batch:], batch, first)
    if profile_to is not None:   # two more steps of the timed batches under torch.profiler (gpu_profile.py)
        import gpu_profile

        def loss_fn(model, b):
            loss_sum, n, _ = objective.loss(model, b)
            return loss_sum / n
        timed = [to_device(collate_packed_pairs(ours[s * batch:(s + 1) * batch]) if packed else
                           collate(ours[s * batch:(s + 1) * batch], pad), device) for s in (warmup, warmup + 1)]
        out["profile"] = gpu_profile.profile(model, loss_fn, timed, profile_to)
        if DEV == "cuda":   # and where the host still waits for the GPU within a step

            def step():
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    loss_fn(model, timed[0]).backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            out["syncs"] = gpu_profile.sync_sites(step)
            print("syncs:", json.dumps(out["syncs"]), flush=True)
    return {**out, "speed_auto": speed_report} if auto else out


def summarize(times: list[float], examples: list[dict], batch: int, first: float) -> dict:
    med = statistics.median(times)
    tokens_per_step = real_tokens(examples) / len(times)
    return {"pairs_per_s": batch / med, "real_tokens_per_s": tokens_per_step / med, "step_s": med,
            "steps_timed": len(times), "peak_gib": peak_gib(), "first_loss": first}


def one(side: str, batch: int, steps: int, warmup: int, profile_to: Path | None = None) -> dict:
    if side == "trl":
        return run_trl(batch, steps, warmup)
    flags = set(side.split("+")[1:])
    limit = next((f[len("limit"):] for f in flags if f.startswith("limit")), None)   # e.g. ts+auto+limit16GiB
    return run_ts(batch, steps, warmup, packed="packed" in flags, compiled="compile" in flags,
                  auto="auto" in flags, memory_limit=limit, profile_to=profile_to)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_dpo.json")
    ap.add_argument("--batches", default="2,4")
    ap.add_argument("--sides", default="trl,ts,ts+compile,ts+packed,ts+packed+compile")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", default="", help="tunesmith sides to profile after timing (comma-separated); "
                                                    "the tables go beside --out as profile_dpo_SIDE_bBATCH.txt")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # side:batch, in a child process
    ap.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        side, batch = args.one.rsplit(":", 1)
        try:
            res = {"ok": True, **one(side, int(batch), args.steps, args.warmup,
                                     Path(args.profile_to) if args.profile_to else None)}
        except Exception as e:   # a side that fails (out of memory, an API change) leaves its row with the reason
            traceback.print_exc()
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = []
    for batch in map(int, args.batches.split(",")):
        for side in args.sides.split(","):
            t0 = time.time()
            cmd = [sys.executable, __file__, "--one", f"{side}:{batch}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            if side in args.profile.split(",") and side != "trl":
                cmd += ["--profile-to", str(Path(args.out).parent / f"profile_dpo_{side.replace('+', '_')}_b{batch}.txt")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else {"ok": False, "error": proc.stderr[-600:]}
            res.update(side=side, batch=batch, wall_s=round(time.time() - t0, 1))
            results.append(res)
            print(json.dumps(res), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                                                  "torch": torch.__version__, "results": results}, indent=2))
    base = {r["batch"]: r for r in results if r["side"] == "trl" and r.get("ok")}
    print(f"{'side':22} {'batch':>5} {'pairs/s':>8} {'tokens/s':>9} {'peak GiB':>9} {'x TRL tok/s':>11} {'x TRL mem':>9}")
    for r in results:
        if not r.get("ok"):
            print(f"{r['side']:22} {r['batch']:>5}  failed: {r['error'][:80]}")
            continue
        t = base.get(r["batch"])
        sp = f"{r['real_tokens_per_s'] / t['real_tokens_per_s']:.2f}" if t else "-"
        mem = f"{r['peak_gib'] / t['peak_gib']:.2f}" if t and t["peak_gib"] else "-"
        print(f"{r['side']:22} {r['batch']:>5} {r['pairs_per_s']:8.2f} {r['real_tokens_per_s']:9.0f} "
              f"{r['peak_gib']:9.2f} {sp:>11} {mem:>9}")


if __name__ == "__main__":
    main()
