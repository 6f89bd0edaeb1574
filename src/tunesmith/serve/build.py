"""An engine (and scorers) from what ``tunesmith serve`` / ``tunesmith chat`` are given on the command line."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import ConfigError
from ..infer.engine import Engine, Request, SamplingParams
from ..infer.engine.text import run_defaults

log = logging.getLogger(__name__)


def split_named(spec: str, flag: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE), or a ConfigError naming the flag."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"{flag} {spec!r}: expected NAME=PATH, e.g. {flag} support=runs/support")
    return name.strip(), value.strip()


def parse_proxy(spec: str) -> tuple[str, str, str, float]:
    """``NAME=EXPERT,ANTI_EXPERT[,ALPHA]`` -> (name, expert, anti_expert, alpha)."""
    name, rest = split_named(spec, "--proxy")
    parts = [p.strip() for p in rest.split(",")]
    if len(parts) not in (2, 3):
        raise ConfigError(f"--proxy {spec!r}: expected NAME=EXPERT,ANTI_EXPERT[,ALPHA], e.g. "
                          "--proxy tuned=runs/small-sft,smollm2-135m,1.0")
    try:
        alpha = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise ConfigError(f"--proxy {spec!r}: ALPHA {parts[2]!r} is not a number") from None
    return name, parts[0], parts[1], alpha


def default_name(model: str) -> str:
    p = Path(model)
    return p.resolve().name if p.exists() else model


def build_engine(model: str, *, name: str | None = None, adapters: list[str] = (), proxies: list[str] = (),
                 device: str = "auto", dtype: str = "auto", system_prompt: str | None = None,
                 **engine_kw) -> Engine:
    """Load ``model`` (anything ``tunesmith.load`` takes) and serve it with the ``--adapter`` and
    ``--proxy`` specs; the run's own system prompt is used unless ``system_prompt`` is given."""
    from ..api import load
    base, tokenizer = load(model, device=device, dtype=dtype)
    defaults = run_defaults(model)
    engine = Engine(base, tokenizer, name=name or default_name(model),
                    system_prompt=system_prompt if system_prompt is not None else defaults["system_prompt"],
                    layout=defaults["layout"], **engine_kw)
    for spec in adapters:
        aname, path = split_named(spec, "--adapter")
        if not Path(path).exists():
            raise ConfigError(f"--adapter {spec!r}: {path} does not exist")
        how = engine.add_adapter(aname, path, system_prompt=system_prompt)
        log.info("adapter %s: %s (%s)", aname, path, "per row on the base" if how == "per-row" else "its own model")
    for spec in proxies:
        pname, expert, anti, alpha = parse_proxy(spec)
        e, _ = load(expert, device=device, dtype=dtype)
        a, _ = load(anti, device=device, dtype=dtype)
        engine.add_proxy(pname, e, a, alpha, system_prompt=system_prompt)
    return engine


def build_scorers(specs: list[str], device: str = "auto", dtype: str = "auto") -> dict:
    from .score import Scorer
    out = {}
    for spec in specs:
        sname, path = split_named(spec, "--score")
        out[sname] = Scorer.load(path, device=device, dtype=dtype)
    return out


def warmup_sizes(spec: str, max_batch: int) -> list[int]:
    """``--warmup`` ("all": every batch bucket, 1, 2, 4, ... up to max_batch; or sizes like "1,8") -> sizes."""
    if spec == "all":
        return sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
    try:
        sizes = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise ConfigError(f"--warmup {spec!r}: expected 'all' or batch sizes such as 1,8,32") from None
    bad = next((n for n in sizes if not 1 <= n <= max_batch), None)
    if bad is not None:
        raise ConfigError(f"--warmup {spec!r}: a batch size must be 1..{max_batch} (--max-batch), got {bad}")
    return sizes


def warm_up(engine: Engine, sizes: list[int]) -> float:
    """Decode a few tokens at each batch size on every lane before the first request, so that the
    compiled decode step of each batch bucket (on a lane with per-row adapters: with every row on the
    base, and with a row on an adapter) is compiled now rather than while requests wait. Returns the
    seconds it took."""
    start = time.perf_counter()
    lanes: dict[int, list[tuple[str, int]]] = {}
    for name, route in engine.routes.items():
        lanes.setdefault(id(route.lane), []).append((name, route.slot))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for routes in lanes.values():
        base = next((n for n, slot in routes if slot < 0), routes[0][0])
        firsts = [base] + [n for n, slot in routes if slot >= 0][:1]
        for size in sizes:
            for first in firsts:
                handles = [engine.submit(Request(prompt=[0], model=name, params=params), sink=lambda out: None)
                           for name in [first] + [base] * (size - 1)]
                engine.run_until_done()
                for h in handles:
                    h.result()
    return time.perf_counter() - start
