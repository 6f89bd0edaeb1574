"""The Export and Evaluate tabs, and the estimate / compare buttons: each calls what the CLI calls.

Export and merge call :func:`tunesmith.export.export` and :func:`tunesmith.merge`; a refusal comes
back with every reason, as `tunesmith export` prints it. ``estimate``, ``eval`` and ``compare`` run
the CLI command of that name (``tunesmith estimate CONFIG``, ``tunesmith eval RUN --data FILE``,
``tunesmith compare ...``) and show what it prints; :func:`command_available` says whether this
build has the command, and the page shows the answer of :func:`unavailable` when it has not.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, TunesmithError
from .jobs import _env


def export(run_dir: Path, target: str, rank: int | None = None, fold_rslora: bool = False,
           out: str | None = None) -> dict:
    from ..export import ExportRefused, export as do_export
    try:
        result = do_export(run_dir, target, out=out or None, rank=rank, fold_rslora=fold_rslora)
    except ExportRefused as e:
        return {"ok": False, "refused": True, "message": str(e)}
    except TunesmithError as e:
        return {"ok": False, "refused": False, "message": str(e)}
    return {"ok": True, "out_dir": str(result.out_dir), "notes": list(result.notes),
            "message": "\n".join([f"{target} adapter written to {result.out_dir}", *result.notes])}


def merge(run_dir: Path, out: str | None = None) -> dict:
    from ..api import merge as do_merge
    out_dir = Path(out) if out else run_dir / "merged"
    if out_dir.exists() and any(out_dir.iterdir()):
        return {"ok": False, "refused": False, "message": f"merge: {out_dir} exists and is not empty; choose another"}
    try:
        path = do_merge(run_dir, out_dir)
    except TunesmithError as e:
        return {"ok": False, "refused": True, "message": str(e)}
    return {"ok": True, "out_dir": str(path), "message": f"merged model written to {path}"}


def command_available(name: str) -> bool:
    from ..cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return name in sub.choices


ISSUE = {"estimate": "memory estimate before a run", "eval": "evaluation of a run on a test file",
         "compare": "the compare table and plots"}


def unavailable(name: str) -> dict:
    return {"ok": False, "available": False,
            "message": f"`tunesmith {name}` ({ISSUE.get(name, name)}) is not in this build of tunesmith; this tab "
                       f"runs it once it is (tunesmith.ui.tools.run_command({name!r}, ...))"}


def run_command(name: str, args: list[str], timeout: float = 3600.0) -> dict:
    """``tunesmith NAME ARGS...``: its exit status and what it printed (stdout and stderr apart)."""
    if not command_available(name):
        return unavailable(name)
    cmd = [sys.executable, "-m", "tunesmith.cli", name, *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"tunesmith {name} did not finish within {timeout:g} s") from None
    return {"ok": p.returncode == 0, "available": True, "command": " ".join(["tunesmith", name, *args]),
            "returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
            "message": p.stdout if p.returncode == 0 else (p.stderr.strip().splitlines() or ["failed"])[-1]}


def evaluate(run_dir: Path, data: str, max_samples=None, args: list[str] = (), page: int = 20) -> dict:
    """``tunesmith eval RUN --data FILE --out RUN/eval/<file>-<n>``; with its results.json and the first
    ``page`` lines of its predictions.jsonl when it wrote them."""
    import json
    if not data:
        raise ConfigError("eval: give a test file")
    base = run_dir / "eval" / Path(data).stem
    out, n = base, 2
    while out.exists():
        out, n = Path(f"{base}-{n}"), n + 1
    extra = ["--max-samples", str(int(max_samples))] if max_samples not in (None, "") else []
    res = run_command("eval", [str(run_dir), "--data", data, "--out", str(out), "--no-progress", *extra, *args])
    if (out / "results.json").is_file():
        res["results"] = json.loads((out / "results.json").read_text())
        res["out_dir"] = str(out)
    if (out / "predictions.jsonl").is_file():
        with (out / "predictions.jsonl").open() as f:
            res["predictions"] = [json.loads(line) for _, line in zip(range(page), f) if line.strip()]
    return res


def compare_runs(run_dirs: list[Path]) -> dict:
    """The table `tunesmith compare` writes (planning/compare.py), for finished runs picked in the Runs tab."""
    import json

    import yaml

    from ..planning import compare
    rows = []
    for d in run_dirs:
        try:
            summary = json.loads((d / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {"status": "running", "reason": "no summary.json yet"}
        try:
            method = yaml.safe_load((d / "config.yaml").read_text())["method"]["name"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            method = d.name
        rows.append(compare.row_of(d.name if d.name == method else f"{d.name} ({method})", summary, d, reused=False))
    return {"ok": True, "stdout": compare.markdown(rows)}
