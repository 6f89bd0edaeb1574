"""Summarization before and after fine-tuning, scored with ROUGE (Google's rouge-score package).

Data: the ``summarization`` rows of databricks-dolly-15k (``../shared/data/dolly15k``: 1,178 in
train.jsonl, 10 in test.jsonl; CC BY-SA 3.0): a paragraph (mostly from Wikipedia) with a request
about it, and a human-written summary. The test file's 10 rows plus ``--eval-rows`` − 10 rows drawn
from train (seeded) are held out for ROUGE; the rest trains. Rows become alpaca rows (instruction,
input = the paragraph, output = the summary), which a decoder trains on with sft and an
encoder-decoder with seq2seq (source = instruction + paragraph, target = summary).

    python bench/summarization.py --data ../shared/data/dolly15k --model smollm2-135m --steps 150 \\
        --out bench/results/summarization_smollm2.json
    python bench/summarization.py --data ../shared/data/dolly15k --model random:t5 --smoke   # seconds

Greedy decoding, ``--max-new-tokens`` new tokens; ROUGE-1/2/L/Lsum F1 × 100 (stemmed) over the held-out
rows, before training (the base model) and after (the run). Writes the scores, the config, timings
and a few example summaries as JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import tunesmith  # noqa: E402
from tunesmith.models.loader import ModelConfig, load_model, load_tokenizer, is_encoder_decoder  # noqa: E402

KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def read_rows(data: Path) -> tuple[list[dict], list[dict]]:
    def rows(name):
        path = data / name
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
                for r in out if r.get("category") == "summarization"]
    return rows("train.jsonl"), rows("test.jsonl")


def split(train: list[dict], test: list[dict], eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    k = max(0, eval_rows - len(test))
    held = [train[i] for i in order[:k]]
    return [train[i] for i in order[k:]], test + held


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_of(row: dict) -> str:
    """The user turn (or source) the training data renders for an alpaca row."""
    return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")


def summarize(model, tokenizer, rows: list[dict], max_new_tokens: int, batch: int) -> list[str]:
    out = []
    for i in range(0, len(rows), batch):
        out += tunesmith.generate(model, [prompt_of(r) for r in rows[i:i + batch]], tokenizer=tokenizer,
                                  max_new_tokens=max_new_tokens)
        print(f"  generated {len(out)}/{len(rows)}", flush=True)
    return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True)
    totals = dict.fromkeys(KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for k in KEYS:
            totals[k] += scores[k].fmeasure
    return {k: round(100 * v / max(len(predictions), 1), 2) for k, v in totals.items()}


def run_config(args, train_file: Path, val_file: Path) -> dict:
    method = {"name": args.method, "r": args.r, "alpha": 2 * args.r} if args.method == "lora" else {"name": args.method}
    return {"model": {"name_or_path": args.model, "device": args.device},
            "method": method,
            "data": {"train": str(train_file), "validation": str(val_file), "format": "alpaca"},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 5,
                      "max_seq_len": args.max_seq_len, "eval_batches": 4, "eval_every": max(args.steps // 3, 1),
                      "seed": args.seed},
            "output": {"dir": str(args.work / "run")}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the dolly15k folder (train.jsonl, test.jsonl)")
    p.add_argument("--model", default="smollm2-135m", help="model.name_or_path (smollm2-135m, random:t5, a directory)")
    p.add_argument("--method", default="lora")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-len", type=int, default=384)
    p.add_argument("--eval-rows", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--gen-batch", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=Path("runs/summarization"))
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--smoke", action="store_true", help="4 steps, 4 held-out rows, 8 new tokens (a pipeline check)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.eval_rows, args.max_new_tokens, args.max_seq_len = 4, 4, 8, 128
    train, test = read_rows(args.data)
    train, held = split(train, test, args.eval_rows, args.seed)
    held = held[:args.eval_rows]
    if args.smoke:
        train = train[:32]
    train_file = write_jsonl(args.work / "data" / "train.jsonl", train)
    val_file = write_jsonl(args.work / "data" / "validation.jsonl", held)
    refs = [r["output"] for r in held]
    mcfg = ModelConfig(name_or_path=args.model, device=args.device)
    task = "seq2seq" if is_encoder_decoder(mcfg) else "causal_lm"

    t0 = time.perf_counter()
    base, tok = load_model(mcfg, task=task, seed=args.seed, vocab_size=len(load_tokenizer(mcfg))), load_tokenizer(mcfg)
    before = summarize(base, tok, held, args.max_new_tokens, args.gen_batch)
    t_before = time.perf_counter() - t0
    del base

    t1 = time.perf_counter()
    run_dir, summary = tunesmith.train(run_config(args, train_file, val_file))
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    tuned, tok = tunesmith.load(run_dir, device=args.device)
    after = summarize(tuned, tok, held, args.max_new_tokens, args.gen_batch)
    t_after = time.perf_counter() - t2

    result = {
        "data": f"{args.data} (category summarization): {len(train)} train rows, {len(held)} held out",
        "model": args.model, "task": task, "method": run_config(args, train_file, val_file)["method"],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rouge_before": rouge(before, refs), "rouge_after": rouge(after, refs),
        "eval_loss_before": summary["eval_loss_before"], "eval_loss_after": summary["eval_loss_after"],
        "trainable_params": summary["trainable_params"], "steps": summary["steps"],
        "time_s": {"generate_before": round(t_before, 1), "train": round(t_train, 1),
                   "generate_after": round(t_after, 1)},
        "run_dir": str(run_dir),
        "examples": [{"reference": r, "before": b, "after": a} for r, b, a in zip(refs[:3], before[:3], after[:3])],
    }
    print(json.dumps({k: result[k] for k in ("rouge_before", "rouge_after", "eval_loss_before", "eval_loss_after",
                                            "time_s")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
