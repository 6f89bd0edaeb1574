"""The multi-process runs of tests/test_distributed.py, all in one pair of processes: forked from the test
(``spawn``), or under torchrun (``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py
SPEC``). SPEC: a JSON file of {name: {"config": dict, "kill_at": step, "copy_to": dir}}; a run with
``kill_at`` raises before that step, and is resumed from its last checkpoint by the same processes."""
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


def _child(rank: int, world: int, port: int, spec_path: str) -> None:
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main(spec_path)
    import torch.distributed as dist
    dist.destroy_process_group()


def spawn(spec_path: str, world: int = 2) -> None:
    """Run SPEC in ``world`` processes forked from this one (no second import of torch and transformers)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_child, args=(world, port, spec_path), nprocs=world, start_method="fork")


if __name__ == "__main__":
    main(sys.argv[1])
