"""`tunesmith serve MODEL_OR_RUN [--adapter NAME=RUN]...`: an OpenAI-compatible HTTP server."""
from __future__ import annotations

import os


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model and named adapters over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions and /v1/completions "
                    "(streaming by server-sent events), POST /v1/score/evaluation, GET /health. The request's "
                    "`model` picks the base, an --adapter or a --proxy by name. See docs/serving.md.")
    p.add_argument("model", help="base model or run: a run directory, adapter, model directory, .gguf or embedded name")
    p.add_argument("--name", help="the name requests use for MODEL (default: its directory name or the name given)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_OR_DIR",
                   help="also serve this run or adapter as NAME (plain LoRA adapters share the base's forward "
                        "passes, the adapter chosen per row; other methods get their own copy of the model)")
    p.add_argument("--proxy", action="append", default=[], metavar="NAME=EXPERT,ANTI_EXPERT[,ALPHA]",
                   help="serve proxy-tuning as NAME: MODEL + ALPHA·(EXPERT − ANTI_EXPERT) (ALPHA default 1)")
    p.add_argument("--score", action="append", default=[], metavar="NAME=RUN_OR_DIR",
                   help="serve a reward or classification model for POST /v1/score/evaluation")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("TUNESMITH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TUNESMITH_API_KEY; unset: open)")
    _limits(p)
    p.set_defaults(fn=_run)


def _limits(p) -> None:
    from ..serve.settings import Settings
    d = Settings()
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--system-prompt", help="system prompt for chat requests without one (default: the run's)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together per model (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those; more get 429 (default 256)")
    p.add_argument("--max-len", type=int, help="prompt + completion tokens at most (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"limit on max_tokens (default {d.max_tokens})")
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"limit on n (default {d.max_n})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"larger request bodies get 413 (default {d.max_body_bytes})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds before a request is cancelled with 504 (default {d.request_timeout:g})")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help=f"on SIGTERM/Ctrl-C, seconds given to requests in flight (default {d.shutdown_timeout:g})")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes): adapters "
                        "named by a path on this machine are loaded and unloaded while the server runs")
    p.add_argument("--warmup", nargs="?", const="all", metavar="SIZES",
                   help="before listening, decode at these batch sizes (e.g. 1,8,32; alone: every batch bucket up "
                        "to --max-batch), so that the first requests do not wait for the compiled step on CUDA")
    p.add_argument("--no-fast", action="store_true", help="decode on the plain path only (no static cache / compile)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's; 1 is fastest on a busy "
                                               "shared machine)")


def _run(args) -> None:
    import signal

    from ..errors import ConfigError, TunesmithError
    for flag, value in (("--max-batch", args.max_batch), ("--max-tokens", args.max_tokens), ("--max-n", args.max_n),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise TunesmithError(f"tunesmith serve needs FastAPI and uvicorn ({e.name} is missing): "
                             "pip install 'tunesmith[serve]'") from None
    from ..serve.app import create_app
    from ..serve.settings import Settings
    from ..serve.build import build_engine, build_scorers, warm_up, warmup_sizes
    sizes = warmup_sizes(args.warmup, args.max_batch) if args.warmup else []
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    engine = build_engine(args.model, name=args.name, adapters=args.adapter, proxies=args.proxy, device=args.device,
                          dtype=args.dtype, system_prompt=args.system_prompt, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_len=args.max_len, fast=False if args.no_fast else "auto")
    scorers = build_scorers(args.score, args.device, args.dtype)
    if sizes:
        took = warm_up(engine, sizes)
        print(f"tunesmith serve: warmed up at batch sizes {', '.join(map(str, sizes))} in {took:.1f} s", flush=True)
    settings = Settings(api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                        max_n=args.max_n, request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
                        allow_adapter_loading=args.allow_adapter_loading)
    app = create_app(engine, settings, scorers)
    sock = listen_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"tunesmith serve: http://{host}:{port}/v1  models: {', '.join(engine.models() + list(scorers))}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(args.shutdown_timeout) + 1)
    # uvicorn finishes the requests in flight on SIGTERM / Ctrl-C, then re-raises the signal to the handler
    # it found: a no-op one lets the command end normally (exit status 0) after a graceful shutdown
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("tunesmith serve: stopped", flush=True)


def listen_socket(host: str, port: int):
    """A socket bound to host:port (IPv6 when the host has a colon), or one ConfigError naming the flags."""
    import socket

    from ..errors import ConfigError
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e})") from None
    return sock
