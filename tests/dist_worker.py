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


def fused_base_node(method: str) -> dict:
    """W0's storage in the fused LoRA base nodes (kernels/lora.py: ``_FrozenLinear`` keeps W0 on ctx, saving
    no tensor) after the forward of a model under fsdp, and when each node's backward reads it."""
    import torch
    from tunesmith.kernels import lora as kernel
    from tunesmith.models.loader import ModelConfig, load_model
    model = load_model(ModelConfig(name_or_path="random:llama", device="cpu", dtype="float32"), task="causal_lm",
                       seed=0)
    model = tunesmith.apply(model, method, r=4)
    distributed.parallelize(model, "fsdp", "fp32", torch.device("cpu"))
    seen, read = [], []
    forward, backward = kernel._FrozenLinear.forward, kernel._FrozenLinear.backward

    def fwd(ctx, x2, weight, z, link):
        seen.append(weight)
        return forward(ctx, x2, weight, z, link)

    def bwd(ctx, g):
        read.append(ctx.weight.untyped_storage().size())
        return backward(ctx, g)

    kernel._FrozenLinear.forward, kernel._FrozenLinear.backward = staticmethod(fwd), staticmethod(bwd)
    try:
        ids = torch.arange(16).reshape(2, 8)
        loss = model(input_ids=ids, labels=ids).loss
        after_forward = [w.untyped_storage().size() for w in seen]
        loss.backward()
    finally:
        kernel._FrozenLinear.forward, kernel._FrozenLinear.backward = forward, backward
    return {"after_forward": after_forward, "in_backward": read}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    real_step = runner.Loop.step
    for name, case in spec.items():
        if "fused" in case:
            found = {m: fused_base_node(m) for m in case["fused"]}
            if distributed.context().main:
                Path(case["out"]).write_text(json.dumps(found))
            continue
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
