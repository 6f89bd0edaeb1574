"""`tunesmith ui [--host --port --runs-dir]`: the browser UI (Train, Runs, Evaluate, Chat, Export) and
its API in one process, on the FastAPI server of `tunesmith serve`. See docs/ui.md."""
from __future__ import annotations

import ipaddress
import os


def add(subparsers) -> None:
    p = subparsers.add_parser("ui", help="the browser UI: configure and launch runs, watch and compare them, chat, "
                                         "export", description=__doc__.replace("\n", " "))
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --api-key)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port, printed at start)")
    p.add_argument("--runs-dir", default="runs", help="where runs are started and listed (default runs)")
    p.add_argument("--api-key", default=os.environ.get("TUNESMITH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $TUNESMITH_API_KEY); "
                        "required on any address but loopback")
    p.add_argument("--device", default="auto", help="where the Chat tab's models run: auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(fn=_run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None) -> None:
    from ..errors import ConfigError
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host}: the UI starts runs and reads files on this machine, so on an address "
                          "other than loopback (127.0.0.1) it needs --api-key KEY (or $TUNESMITH_API_KEY)")


def _run(args) -> None:
    import signal

    from ..errors import ConfigError, TunesmithError
    check_host(args.host, args.api_key)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise TunesmithError(f"tunesmith ui needs FastAPI and uvicorn ({e.name} is missing): "
                             "pip install 'tunesmith[serve]'") from None
    from ..ui.app import create_app
    app = create_app(args.runs_dir, api_key=args.api_key, device=args.device, dtype=args.dtype)
    from .serve import listen_socket
    sock = listen_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"tunesmith ui: http://{host}:{port}/  runs: {args.runs_dir}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    print("tunesmith ui: stopped (runs it started go on; the next `tunesmith ui` shows them)", flush=True)
