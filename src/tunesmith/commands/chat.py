"""`tunesmith chat MODEL_OR_RUN`: talk to a model or run in the terminal, the answer streamed as it
is decoded. The conversation is kept (the model sees the whole history, rendered with the chat
template the run trained with); ``/reset`` clears it, ``/exit`` (or Ctrl-D) quits, Ctrl-C stops an
answer."""
from __future__ import annotations

import sys


def add(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model or run in the terminal (streaming)",
                              description=__doc__.split("\n", 1)[1].replace("\n", " "))
    p.add_argument("model", help="a run directory, adapter, model directory, .gguf or embedded name (smollm2-135m)")
    p.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's repetition penalty (default 1: off)")
    p.add_argument("--seed", type=int, help="seed of the first answer (the next ones count up from it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's)")
    p.set_defaults(fn=_run)


def _params(args):
    from ..infer.engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def _run(args) -> None:
    from ..serve.build import build_engine
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    params = _params(args)
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, system_prompt=args.system,
                          max_batch=1, fast=False)
    print(f"tunesmith chat: {args.model} — /reset clears the history, /exit quits", flush=True)
    engine.start()
    try:
        repl(engine, params)
    finally:
        engine.shutdown(timeout=1)


def repl(engine, params, read=input, out=sys.stdout) -> None:
    """Read a turn, stream the answer, repeat. ``read`` and ``out`` are the terminal (tests pass others)."""
    from ..infer.engine import Request
    history: list[dict] = []
    turn = 0
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            out.write("(history cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line}; commands: /reset, /exit\n")
            continue
        history.append({"role": "user", "content": line})
        p = params if params.seed is None else params.replace(seed=params.seed + turn)
        handle = engine.submit(Request(messages=list(history), params=p, stream=True))
        text = []
        try:
            for delta in handle:
                out.write(delta.text)
                out.flush()
                text.append(delta.text)
                if delta.finished and delta.finish_reason == "error":
                    out.write(f"\n[error: {delta.error}]")
        except KeyboardInterrupt:
            handle.cancel()
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(text)})
        turn += 1
