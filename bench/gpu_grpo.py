"""GRPO step time: tunesmith's online step against TRL's GRPOTrainer (its default generation path,
``model.generate``, no vLLM) in one call.

    export PYTHONPATH=$PWD/.whl/site:$PWD/src
    python3 bench/gpu_grpo.py --out bench/results/gpu_grpo.json              # 1b and 8b, both sides
    python3 bench/gpu_grpo.py --only 8b --sides tunesmith --completion 4096  # one side, a longer completion
    python3 bench/gpu_grpo.py --only 8b --sides tunesmith --prompts 1 --completion 20480 --micro-batch 1 \
        --steps 1 --warmup 0 --watch 20                                     # the long-completion run
    python3 bench/gpu_grpo.py --tiny                                         # CPU, tiny models, a few tokens

Random-weight Llama-3.2-1B / Llama-3-8B architectures (bench/gpu_common.py: config from a dict, no hub),
bf16, LoRA r16 (alpha 32) on the 7 projections, gradient checkpointing, G = 8 completions of 2 prompts
(16 rows), 256-token prompts of random ids, 512 new tokens, temperature 1, β = 0, the dapo loss, one
update per rollout, a random reward (both sides learn from noise at the same cost). The tokenizer is a
word-level one built here over the model's vocabulary (``t0 t1 …``), so a prompt is exactly 256 tokens for
both. A random model seldom samples EOS, so completions run to 512 tokens on both sides (reported).

Each side runs ``--warmup`` steps, then ``--steps`` timed ones (median). Reported per side: step time,
its generation and update parts (tunesmith: the step's own split; TRL: time spent inside its
``_generate_single_turn`` and the rest of the step), generated tokens/s (rows × new tokens / generation
time), peak GiB (torch.cuda.max_memory_allocated over the timed steps), completion tokens. Then
tunesmith's steps/s over TRL's and its peak over TRL's (the target: ≥ 5× at no more memory).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
TINY = "--tiny" in sys.argv
if TINY:
    os.environ.setdefault("BENCH_DEVICE", "cpu")
    os.environ.setdefault("BENCH_TINY", "1")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))

import torch  # noqa: E402

import gpu_common as gc_  # noqa: E402

PROMPTS, G = 2, 8


def random_reward(prompts, completions, **fields):
    return [random.random() for _ in completions]


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ids 0..vocab-1 ("t<i>"), eos t0 and pad t1: prompts round-trip exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t1", unk_token="t2")


def prompt_ids(vocab: int, n: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


# -- tunesmith ------------------------------------------------------------------------------------------
def watch_decoding(every_s: float) -> None:
    """Print, every ``every_s`` seconds, how many decode steps the rollout engine has run and the GPU's peak
    so far, so that a step cut short by a call's time limit still says how far it got and how fast."""
    import threading
    from tunesmith.infer.engine import fast, runner
    count = {"n": 0, "t0": time.perf_counter()}
    for cls in (fast.StaticRunner, runner.ModelRunner):
        real = cls.decode

        def counted(self, last, _real=real):
            count["n"] += 1
            return _real(self, last)
        cls.decode = counted

    def report():
        while True:
            time.sleep(every_s)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            print(f"  [{time.perf_counter() - count['t0']:.0f} s] {count['n']} decode steps, peak {peak:.1f} GiB",
                  flush=True)
    threading.Thread(target=report, daemon=True).start()


def tunesmith_side(arch: str, prompts: list[list[int]], new: int, steps: int, warmup: int,
                   micro_batch: int | None = None) -> dict:
    import tunesmith
    from tunesmith.train.accel import enable_checkpointing
    from tunesmith.train.objectives import get
    from tunesmith.train.rl import rewards
    model = gc_.build_model(arch)
    model = tunesmith.apply(model, "lora", target_modules=gc_.TARGETS, **gc_.LORA)
    gc_.upcast_trainable(model)
    enable_checkpointing(model, None, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=gc_.DEV == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    obj = get({"name": "grpo", "num_generations": G, "max_tokens": new, "loss_type": "dapo", "beta": 0.0,
               "rewards": [{"function": "length_penalty"}],
               **({"micro_batch": micro_batch} if micro_batch else {})})
    obj.reward_fns = [rewards.Reward("random", random_reward, 1.0, {})]
    train = SimpleNamespace(max_seq_len=len(prompts[0]), seed=0, batch_size=PROMPTS, grad_accum=1,
                            max_grad_norm=1.0)
    obj.run = SimpleNamespace(train=train, run_dir=Path(tempfile.mkdtemp()))
    examples = [{"prompt_ids": p, "prompt": "", "fields": {}, "loc": f"prompt:{i}"} for i, p in enumerate(prompts)]
    from tunesmith.train.distributed import Single
    noop = lambda *a, **k: None  # noqa: E731
    loop = SimpleNamespace(cfg=train, model=model, params=params, optimizer=opt, scheduler=sched,
                           method=SimpleNamespace(on_step_begin=noop, before_optimizer_step=noop,
                                                  after_optimizer_step=noop),
                           batches=SimpleNamespace(get=lambda micro: {"examples": examples}, pad_id=1),
                           device=torch.device(gc_.DEV), precision="bf16" if gc_.DEV == "cuda" else "fp32",
                           parallel=Single(), strategies=[])
    step = obj.train_step(batches=loop.batches, tokenizer=None, run=obj.run)
    state = SimpleNamespace(step=0, micro=0, tokens=0)
    records = []
    for i in range(warmup + steps):
        if i == warmup:
            gc_.sync()
            if gc_.DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
        gc_.sync()
        t0 = time.perf_counter()
        rec = step(loop, state)
        gc_.sync()
        rec["step_s"] = time.perf_counter() - t0
        records.append(rec)
        print(f"tunesmith {arch} step {i}: {rec['step_s']:.2f} s, generation {rec['generation_s']:.2f} s", flush=True)
    timed = records[warmup:]
    out = _summary([r["step_s"] for r in timed], [r["generation_s"] for r in timed],
                   [r["completion_length"] * PROMPTS * G for r in timed])
    out["loss_first"] = records[0]["loss"]
    out["truncated"] = statistics.median(r["truncated"] for r in timed)   # the fraction cut at the limit
    del model, opt, step, obj
    gc_.free()
    return out


# -- TRL ------------------------------------------------------------------------------------------------
def trl_side(arch: str, prompts: list[list[int]], new: int, steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    model = gc_.build_model(arch)
    tok = word_tokenizer(model.config.vocab_size)
    data = Dataset.from_list([{"prompt": " ".join(f"t{i}" for i in p)} for p in prompts] * (warmup + steps + 2))
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=new, beta=0.0, loss_type="dapo", learning_rate=1e-5,
                      max_steps=warmup + steps, logging_steps=1, save_strategy="no", report_to=[],
                      bf16=gc_.DEV == "cuda", gradient_checkpointing=True, temperature=1.0, seed=0,
                      use_cpu=gc_.DEV != "cuda", dataloader_num_workers=0, shuffle_dataset=False)
    peft_cfg = LoraConfig(r=gc_.LORA["r"], lora_alpha=gc_.LORA["alpha"], lora_dropout=0.0,
                          target_modules=gc_.TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[random_reward], args=args, train_dataset=data,
                          processing_class=tok, peft_config=peft_cfg)
    gen = {"s": 0.0, "tokens": 0}
    inner = trainer._generate_single_turn

    def timed_generate(*a, **k):
        gc_.sync()
        t0 = time.perf_counter()
        out = inner(*a, **k)
        gc_.sync()
        gen["s"] += time.perf_counter() - t0
        ids = out[0]                        # (completion_ids, logprobs): one list of ids per row
        gen["tokens"] += sum(len(c) for c in ids)
        return out
    trainer._generate_single_turn = timed_generate
    rows = {"step": [], "gen": [], "tok": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and gc_.DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            gc_.sync()
            gen["s"], gen["tokens"] = 0.0, 0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            gc_.sync()
            rows["step"].append(time.perf_counter() - self.t0)
            rows["gen"].append(gen["s"])
            rows["tok"].append(gen["tokens"])
            print(f"trl {arch} step {len(rows['step'])}: {rows['step'][-1]:.2f} s, generation {gen['s']:.2f} s",
                  flush=True)
    trainer.add_callback(Clock())
    trainer.train()
    out = _summary(rows["step"][warmup:], rows["gen"][warmup:], rows["tok"][warmup:])
    del trainer, model
    gc_.free()
    return out


def _summary(step_s, gen_s, tokens) -> dict:
    med = statistics.median
    step, gen = med(step_s), med(gen_s)
    return {"step_s": step, "generation_s": gen, "update_s": step - gen, "steps_per_s": 1 / step,
            "completion_tokens": med(tokens) if tokens else None,
            "generated_tokens_per_s": (med(tokens) / gen) if tokens and gen else None,
            "peak_gib": gc_.peak_gib(), "steps_timed": len(step_s)}


def main() -> None:
    global PROMPTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny models, a few tokens (a smoke test)")
    ap.add_argument("--only", default="1b,8b", help="architectures: 1b, 8b")
    ap.add_argument("--sides", default="tunesmith,trl")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step (G = 8 completions each)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="tunesmith: completions per forward/backward of the update (default: the objective's, 8; "
                         "16 = all of them in one pass)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / ("gpu_grpo_tiny.json" if TINY else "gpu_grpo.json")))
    ap.add_argument("--watch", type=float, default=None, metavar="S",
                    help="print the rollout's decode steps and the GPU peak every S seconds (long completions)")
    a = ap.parse_args()
    PROMPTS = a.prompts
    if a.watch:
        watch_decoding(a.watch)
    if a.tiny:
        a.prompt, a.completion, a.steps, a.warmup = min(a.prompt, 16), min(a.completion, 8), min(a.steps, 2), 1
    result = {"versions": gc_.versions(), "prompts": PROMPTS, "G": G, "prompt_tokens": a.prompt,
              "max_new_tokens": a.completion, "micro_batch": a.micro_batch, "lora": gc_.LORA, "runs": {}}
    try:
        import trl
        result["versions"]["trl"] = trl.__version__
    except ImportError:
        result["versions"]["trl"] = None
    for arch in a.only.split(","):
        prompts = prompt_ids(gc_.ARCHS[arch]["vocab_size"], PROMPTS, a.prompt)
        runs = result["runs"].setdefault(arch, {})
        for side in a.sides.split(","):
            try:
                if side == "tunesmith":
                    runs[side] = tunesmith_side(arch, prompts, a.completion, a.steps, a.warmup, a.micro_batch)
                else:
                    runs[side] = trl_side(arch, prompts, a.completion, a.steps, a.warmup)
            except Exception as e:   # one failing side is reported, the other still runs
                runs[side] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                gc_.free()
            print(arch, side, json.dumps({k: v for k, v in runs[side].items() if k != "traceback"}), flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2))   # after every side: a cut-short call keeps its rows
        ts, hf = runs.get("tunesmith", {}), runs.get("trl", {})
        if "step_s" in ts and "step_s" in hf:
            runs["speedup_steps_per_s"] = hf["step_s"] / ts["step_s"]
            runs["peak_ratio"] = ts["peak_gib"] / hf["peak_gib"] if hf["peak_gib"] else None
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
