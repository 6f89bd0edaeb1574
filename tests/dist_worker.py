"""Runs under torchrun (tests/test_distributed.py): the multi-process runs of the distributed tests,
all in one pair of processes. argv: a JSON file of {name: {"config": dict, "kill_at": step?}}."""
import json
import shutil
import sys
from pathlib import Path

import tunesmith
from tunesmith.train import distributed, runner


class Killed(Exception):
    pass


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    real_step = runner.Loop.step
    for name, case in spec.items():
        kill_at = case.get("kill_at")

        def step(self, state, _kill=kill_at):
            if _kill is not None and state.step == _kill:
                raise Killed(f"killed before step {_kill + 1}")
            return real_step(self, state)

        runner.Loop.step = step
        try:
            run_dir, _ = tunesmith.train(case["config"])
        except Killed:
            run_dir = Path(case["config"]["output"]["dir"])
            if distributed.context().main and case.get("copy_to"):
                shutil.copytree(run_dir, case["copy_to"])
            distributed.barrier()
            runner.Loop.step = real_step
            tunesmith.train(None, resume=run_dir)
        runner.Loop.step = real_step


if __name__ == "__main__":
    main(sys.argv[1])
