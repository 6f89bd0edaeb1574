"""The distributed path on one GPU: ``TUNESMITH_DISTRIBUTED=1 torchrun --nproc_per_node 1 -m tunesmith train``
runs a process group of one (NCCL), so fsdp (FSDP2 with its bf16 mixed-precision policy), ddp, the DCP
checkpoints and the gathered save run on CUDA; each run is compared with the plain single-process run of
the same config. Writes JSON.

Runs, on a random-weight model of Llama-3.2-1B's width with 4 blocks (the embedded MiniLM tokenizer's
vocabulary), packed text rows of ``--seq`` tokens, ``train.speed: off``:

* ``lora`` (bf16 base) single, under fsdp and under ddp; ``full`` (fp32 weights, bf16 compute) single
  and under fsdp; ``lora`` under fsdp with ``train.compile`` and ``train.gradient_checkpointing``;
* the fsdp LoRA run resumed from its middle checkpoint under fsdp, and by a plain single process.

    python3 bench/gpu_fsdp_one.py --out $OUT/gpu_fsdp_one.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from gpu_multi import ROOT, TARGETS, TINY, write_data  # noqa: E402

WIDE_4 = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
              num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)


def config(method: str, data: Path, out: Path, args) -> dict:
    full = method == "full"
    model = {"name_or_path": "random:llama", "random_overrides": TINY if args.tiny else WIDE_4,
             "dtype": "float32" if full or args.tiny else "bfloat16", "device": "cpu" if args.tiny else "auto"}
    return {"model": model,
            "method": {"name": "full"} if full else {"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS},
            "data": {"train": str(data), "format": "text", "val_split": 0.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.seq,
                      "lr": 1e-5 if full else 2e-4, "progress": False, "seed": 0, "speed": "off",
                      "precision": "fp32" if args.tiny else "bf16",
                      "save_every": args.steps // 2},
            "output": {"dir": str(out), "plot": False}}


def train(cfg_path: Path, overrides: list[str], distributed: bool, resume: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    args = ["train", *([] if resume else [str(cfg_path)]), *overrides, *(["--resume", str(resume)] if resume else [])]
    if distributed:
        env["TUNESMITH_DISTRIBUTED"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "tunesmith", *args]
    else:
        env.pop("TUNESMITH_DISTRIBUTED", None)
        cmd = [sys.executable, "-m", "tunesmith", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": time.perf_counter() - t0,
            "tail": (proc.stdout + proc.stderr)[-3000:] if proc.returncode else ""}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def record(name: str, run_dir: Path, res: dict) -> dict:
    if res["rc"] == 0:
        s = json.loads((run_dir / "summary.json").read_text())
        res.update(losses=losses(run_dir), peak_gib=s["peak_memory_gib"], tokens_per_s=s["tokens_per_s"],
                   parallel=s.get("parallel"), artifact=sorted(p.name for p in Path(s["artifact"]).iterdir()))
    print(f"{name}: rc {res['rc']}  losses {[round(x, 4) for x in res.get('losses', [])]}  "
          f"peak {res.get('peak_gib', 0):.2f} GiB  {res.get('tokens_per_s', 0):,.0f} tok/s  {res['wall_s']:.0f}s\n{res['tail']}",
          flush=True)
    return {"run": name, **res}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo): checks the script")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="tokens a row (default 1024; tiny 32)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_fsdp_one.json"))
    args = p.parse_args(argv)
    args.seq = args.seq or (32 if args.tiny else 1024)
    import torch
    meta = {"benchmark": "gpu_fsdp_one", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "args": vars(args), "results": []}
    plan = [("lora-single", "lora", [], False), ("lora-fsdp", "lora", ["train.parallel=fsdp"], True),
            ("lora-ddp", "lora", ["train.parallel=ddp"], True), ("full-single", "full", [], False),
            ("full-fsdp", "full", ["train.parallel=fsdp"], True)]
    last = ("lora-fsdp-compile-ckpt", "lora", ["train.parallel=fsdp", "train.compile=true",
                                                "train.gradient_checkpointing=true"], True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_data(work / "text.jsonl", rows=args.steps * args.batch_size * 2 + 8, words=args.seq + 8)
        for name, method, overrides, dist in plan:
            cfg = work / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(config(method, data, work / name, args)))
            meta["results"].append(record(name, work / name, train(cfg, overrides, dist)))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(meta, indent=2))
        src = work / "lora-fsdp"
        if (src / "summary.json").is_file():
            half = args.steps // 2
            for name, dist in (("lora-fsdp-resumed", True), ("lora-fsdp-resumed-single", False)):
                dst = work / name
                shutil.copytree(src, dst)
                shutil.rmtree(dst / "checkpoints" / f"step-{args.steps}")
                (dst / "summary.json").unlink()
                meta["results"].append(record(name, dst, train(dst / "config.yaml", [], dist, resume=dst)))
                Path(args.out).write_text(json.dumps(meta, indent=2))
            ref = losses(src)[half:]
            meta["resumed_max_rel_diff"] = {   # steps after the checkpoint, against the uninterrupted run
                r["run"]: max((abs(a - b) / abs(b) for a, b in zip(r.get("losses", [])[half:], ref)), default=None)
                for r in meta["results"] if r["run"].startswith("lora-fsdp-resumed")}
        name, method, overrides, dist = last
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config(method, data, work / name, args)))
        meta["results"].append(record(name, work / name, train(cfg, overrides, dist)))
        Path(args.out).write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta.get("resumed_max_rel_diff")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
