"""Runs started from the UI: each one a ``tunesmith train`` subprocess, its output in a log file.

A job writes its config to ``RUNS/.ui/NAME.yaml`` (output.dir set to ``RUNS/NAME``, a directory
reserved by the same rule as the runner's: an existing non-empty one gets -2, -3, ...) and its output
to ``RUNS/.ui/NAME.log``; ``RUNS/.ui/NAME.json`` records the command and how it ended, so that the
runs tab knows the job after the UI restarts. Stop sends SIGINT, the runner's Ctrl-C: the run is
marked ``interrupted`` and keeps its checkpoints; resume is ``tunesmith train --resume RUN``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import ConfigError

STATE = ".ui"
#: tqdm's line of the training loop: "train:  40%|████      | 4/10 [00:02<00:03,  1.9step/s, loss=...]"
_BAR = re.compile(r"train:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([0-9:]+)<([0-9:?]+)")


def stem(name: str) -> str:
    """The file name under .ui of run ``name`` (a path relative to the runs directory)."""
    return name.replace("/", "__")


def _env() -> dict:
    """The child's environment: this tunesmith first on the path (a checkout run with PYTHONPATH=src too)."""
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Job:
    def __init__(self, name: str, run_dir: Path, cmd: list[str], state_dir: Path, kind: str):
        self.name, self.run_dir, self.cmd, self.kind = name, run_dir, cmd, kind
        self.log_path = state_dir / f"{stem(name)}.log"
        self.meta_path = state_dir / f"{stem(name)}.json"
        self.started = time.time()
        self.returncode: int | None = None
        self.stopping = False
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=_env(), start_new_session=True)
        self._save()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.returncode = self.proc.wait()
        self._save()

    def _save(self) -> None:
        self.meta_path.write_text(json.dumps({"name": self.name, "run_dir": str(self.run_dir), "cmd": self.cmd,
                                              "kind": self.kind, "pid": self.proc.pid, "started": self.started,
                                              "returncode": self.returncode}))

    @property
    def alive(self) -> bool:
        return self.returncode is None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        """SIGINT (the run saves its state as interrupted), then SIGTERM and SIGKILL if it does not end."""
        if not self.alive:
            return
        self.stopping = True
        self.proc.send_signal(signal.SIGINT)

        def escalate():
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        threading.Thread(target=escalate, daemon=True).start()


class Jobs:
    """The jobs of one runs directory."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.state_dir = self.runs_dir / STATE
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def reserve(self, output_dir: str) -> Path:
        """The run directory for ``output_dir`` (inside the runs directory), created empty now."""
        base = Path(output_dir)
        root = self.runs_dir.resolve()
        full = (base if base.is_absolute() else Path.cwd() / base).resolve()
        if full == root or root not in full.parents:
            raise ConfigError(f"output.dir: {output_dir!r} is outside the runs directory {self.runs_dir} that this "
                              f"UI shows; give a directory inside it, e.g. {self.runs_dir / 'run'}")
        path, n = full, 2
        while (path.exists() and any(path.iterdir())) or self._name(path) in self.jobs:
            path, n = Path(f"{full}-{n}"), n + 1
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _name(self, path: Path) -> str:
        return path.resolve().relative_to(self.runs_dir.resolve()).as_posix()

    def start(self, cfg_yaml: str, run_dir: Path) -> Job:
        """``tunesmith train`` on ``cfg_yaml`` (whose output.dir is ``run_dir``) in the background."""
        with self.lock:
            name = self._name(run_dir)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path = self.state_dir / f"{stem(name)}.yaml"
            path.write_text(cfg_yaml)
            job = Job(name, run_dir, [sys.executable, "-m", "tunesmith.cli", "train", str(path)], self.state_dir, "train")
            self.jobs[name] = job
            return job

    def resume(self, name: str, run_dir: Path, overrides: list[str] = ()) -> Job:
        """``tunesmith train --resume RUN [key=value ...]``: continue from the newest checkpoint."""
        with self.lock:
            old = self.jobs.get(name)
            if old is not None and old.alive:
                raise ConfigError(f"run {name} is still running; stop it first")
            if not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").iterdir()):
                raise ConfigError(f"--resume {run_dir}: the run has no checkpoint to resume from (set "
                                  "train.save_every or train.eval_every to save them during a run)")
            for o in overrides:
                if "=" not in o:
                    raise ConfigError(f"override {o!r}: expected key.sub=value, e.g. train.max_steps=100")
            self.state_dir.mkdir(parents=True, exist_ok=True)
            job = Job(name, run_dir, [sys.executable, "-m", "tunesmith.cli", "train", "--resume", str(run_dir), *overrides],
                      self.state_dir, "resume")
            self.jobs[name] = job
            return job

    def stop(self, name: str) -> bool:
        job = self.jobs.get(name)
        if job is None or not job.alive:
            return False
        job.stop()
        return True

    def known(self) -> dict[str, dict]:
        """Jobs recorded under .ui (this UI's and earlier ones'), by run name."""
        out = {}
        if self.state_dir.is_dir():
            for f in self.state_dir.glob("*.json"):
                try:
                    meta = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                out[meta["name"]] = meta
        return out

    def log_of(self, name: str) -> Path:
        return self.state_dir / f"{stem(name)}.log"

    def shutdown(self) -> None:
        for job in self.jobs.values():
            job.stop(grace=5.0)


def bar_progress(log: str) -> dict | None:
    """Step, total, elapsed and ETA from the last progress-bar line in a job's log."""
    last = None
    for m in _BAR.finditer(log):
        last = m
    if last is None:
        return None
    return {"step": int(last.group(1)), "total": int(last.group(2)), "elapsed": last.group(3), "eta": last.group(4)}


def error_line(log: str) -> str | None:
    """The CLI's "error: ..." message at the end of a failed job's log (all its lines), if any."""
    i = log.rfind("\nerror: ")
    if i < 0:
        return log[7:].strip() if log.startswith("error: ") else None
    return log[i + 8:].strip()
