"""A bounded load test of `tunesmith serve` on loopback: 100 concurrent chat requests to the embedded
SmolLM2-135M with two LoRA adapters, through the official ``openai`` client (async, streaming).

    python bench/serve_load.py --out bench/results/serve_load.json [--requests 100] [--max-tokens 32]

Trains the two adapters first (a few LoRA steps each on examples/data/quickstart.jsonl, split in
two halves; ``--adapters A,B`` reuses existing runs), starts the server as a child process, sends
every request at once (the models cycle base, a, b), then checks the error answers (malformed JSON,
an unknown model, a negative and a huge max_tokens, a missing and a wrong key, an oversized body)
and that the server still answers after each. Writes latency (p50/p95, time to first token), the
completion tokens per second over the whole run and the failures as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-load-test"


def train_adapters(tmp: Path, steps: int) -> list[Path]:
    import tunesmith
    rows = [json.loads(line) for line in (ROOT / "examples/data/quickstart.jsonl").read_text().splitlines()]
    runs = []
    for i, (name, part) in enumerate((("a", rows[::2]), ("b", rows[1::2]))):
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in part))
        cfg = {"model": {"name_or_path": "smollm2-135m", "device": "cpu"},
               "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
               "data": {"train": str(data), "format": "alpaca", "val_split": 0.0},
               "train": {"max_steps": steps, "batch_size": 4, "lr": 2e-3, "max_seq_len": 64, "seed": i,
                         "progress": False},
               "output": {"dir": str(tmp / f"run-{name}"), "plot": False}}
        run, _ = tunesmith.train(cfg)
        runs.append(Path(run))
    return runs


def start_server(runs: list[Path], max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "smollm2-135m", "--name", "base", "--port", "0",
           "--api-key", KEY, "--max-batch", str(max_batch), "--max-queue", "512", "--max-tokens", "256",
           "--threads", str(threads),
           "--adapter", f"a={runs[0]}", "--adapter", f"b={runs[1]}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    while not (seen and seen[-1].startswith("tunesmith serve: http://")):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(seen))
        seen.append(line)
    url = seen[-1].split()[2]
    for _ in range(600):
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    return proc, url


async def one(client, i: int, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, text, finish, usage = None, [], None, None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.7,
            seed=i, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    first = first or time.perf_counter()
                    text.append(c.delta.content)
                finish = c.finish_reason or finish
    except Exception as e:  # a failure is counted, never hidden
        return {"ok": False, "model": model, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"ok": finish in ("stop", "length") and usage is not None, "model": model, "latency_s": end - t0,
            "ttft_s": (first or end) - t0, "completion_tokens": usage.completion_tokens if usage else 0,
            "finish_reason": finish, "chars": len("".join(text))}


async def load(url: str, n: int, max_tokens: int) -> tuple[list[dict], float]:
    import openai
    rows = [json.loads(line) for line in (ROOT / "examples/data/quickstart.jsonl").read_text().splitlines()]
    prompts = [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")) for r in rows]
    models = ["base", "a", "b"]
    async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, i, models[i % 3], prompts[i % len(prompts)], max_tokens)
                                         for i in range(n)))
        return list(results), time.perf_counter() - t0


def post(url: str, body: bytes, key: str | None) -> tuple[int, dict]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except urllib.error.URLError as e:   # the server closed the connection before reading the whole body
        return -1, {"connection": str(e.reason)}


def error_checks(url: str) -> list[dict]:
    ok = b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
    cases = [("malformed JSON", b'{"model": "base", "messages": [', KEY, 400),
             ("unknown model", ok.replace(b'"base"', b'"nope"'), KEY, 404),
             ("negative max_tokens", ok.replace(b'"max_tokens": 4', b'"max_tokens": -1'), KEY, 400),
             ("huge max_tokens", ok.replace(b'"max_tokens": 4', b'"max_tokens": 10000000'), KEY, 400),
             ("missing key", ok, None, 401), ("wrong key", ok, "sk-wrong", 401),
             ("oversized body", ok.replace(b'"hi"', b'"' + b"x" * (2 << 20) + b'"'), KEY, 413)]
    out = []
    for name, body, key, want in cases:
        status, answer = post(url, body, key)
        after, _ = post(url, ok, KEY)
        shaped = set(answer.get("error", {})) == {"message", "type", "param", "code"}
        out.append({"case": name, "status": status, "expected": want, "openai_shaped": shaped,
                    "message": answer.get("error", {}).get("message", "")[:120], "answers_after": after == 200})
    return out


def summary(results: list[dict], wall: float) -> dict:
    good = [r for r in results if r["ok"]]
    lat = sorted(r["latency_s"] for r in good)
    ttft = sorted(r["ttft_s"] for r in good)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    tokens = sum(r["completion_tokens"] for r in good)
    return {"requests": len(results), "failures": len(results) - len(good),
            "failure_samples": [r.get("error") for r in results if not r["ok"]][:5],
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "latency_max_s": lat[-1] if lat else None,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "mean_tokens_per_request": statistics.mean(
                r["completion_tokens"] for r in good) if good else 0,
            "by_model": {m: sum(1 for r in good if r["model"] == m) for m in ("base", "a", "b")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_load.json"))
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--adapters", help="A,B: existing runs to serve as a and b (skips the training)")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads of the server (and the training)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        runs = [Path(p) for p in args.adapters.split(",")] if args.adapters else train_adapters(Path(tmp), args.train_steps)
        train_s = time.perf_counter() - t0
        proc, url = start_server(runs, args.max_batch, args.threads)
        try:
            results, wall = asyncio.run(load(url, args.requests, args.max_tokens))
            errors = error_checks(url)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
           "model": "smollm2-135m (fp32, CPU)", "adapters": "two LoRA r=8 runs on q/k/v/o, per row on the base",
           "max_tokens": args.max_tokens, "max_batch": args.max_batch, "threads": args.threads, "temperature": 0.7, "train_s": train_s,
           "server_exit_code": proc.returncode, **summary(results, wall), "errors": errors,
           "errors_ok": all(e["status"] == e["expected"] and e["openai_shaped"] and e["answers_after"] for e in errors)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "errors"}, indent=2))
    return 0 if out["failures"] == 0 and out["errors_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
