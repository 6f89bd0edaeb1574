"""More than one process (torchrun): the run context, data sharded by rank, and FSDP2 or replicated
data parallelism applied from outside the model and the methods.

``torchrun --nproc_per_node N -m tunesmith train CONFIG`` starts N copies of a run; ``init`` joins the
process group that torchrun describes in the environment (NCCL on CUDA, gloo on the CPU). Every process
builds the same model from the same seed, then ``parallelize`` applies ``train.parallel``:

* ``fsdp``: FSDP2's ``fully_shard`` on each transformer block, then on the whole model (the blocks are
  checkpointed and compiled first, by ``accel.after_method``), with FSDP2's mixed-precision policy
  (bf16 parameters in compute with ``train.precision: bf16``, gradients reduced in fp32). Parameters,
  gradients and optimizer states are split across processes.
* ``ddp``: every process keeps the whole model; after the last micro-batch of a step the gradients are
  averaged across processes in one bucketed all-reduce (so the objectives may call any submodule,
  e.g. the decoder and the head apart for the chunked loss).

Each process divides its loss by the item count of the whole global step (all processes, all
micro-batches) and multiplies it by the world size, and the gradients are averaged over the processes,
so N processes of batch ``b`` take the step one process of batch ``N·b`` takes (a method's
regularization term, the same on every process, keeps its weight). Only the last micro-batch of a step
synchronises. The step's loss and extra sums are summed across processes before they are logged.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..data import batch_indices
from ..errors import ConfigError
from .loop import Batches

# hooks that read or edit whole parameters or gradients, which FSDP2 holds as shards (checkpoints under
# fsdp hold the model's own sharded state instead of ``trainable_state``; the methods that keep more than
# their parameters there also override one of these)
_WHOLE_TENSOR_HOOKS = ("prepare", "on_step_begin", "regularization", "before_optimizer_step", "after_optimizer_step")


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank 0 of world 1 without torchrun. ``joined``: in a process
    group, so the run takes the distributed path (sharded batches, train.parallel, DCP checkpoints),
    also with one process when ``TUNESMITH_DISTRIBUTED=1`` (a check of that path on one GPU)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


_CONTEXT = Context()


def context() -> Context:
    return _CONTEXT


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_distributed() -> bool:
    """Whether this process is to join a process group: torchrun started several, or one is asked to."""
    return env_world() > 1 or (os.environ.get("TUNESMITH_DISTRIBUTED") == "1" and "RANK" in os.environ)


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this process's device (``cuda:LOCAL_RANK``)."""
    global _CONTEXT
    if not env_distributed():
        return device
    rank, world, local = int(os.environ["RANK"]), env_world(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"--nproc / --nproc_per_node: process {local} of this machine has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); start at most that many processes a machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _CONTEXT = Context(rank=rank, world=world, local_rank=local, joined=True)
    return device


def check(tc, method_cls, objective) -> None:
    """Refuse, before any weights load, what ``train.parallel`` cannot run (one process: nothing)."""
    if not env_distributed() or tc.parallel != "fsdp":
        return
    from ..methods.registry import Method
    hooks = [h for h in _WHOLE_TENSOR_HOOKS if getattr(method_cls, h) is not getattr(Method, h)]
    if hooks:
        raise ConfigError(f"train.parallel: fsdp shards every parameter, and method {method_cls.name!r} reads or "
                          f"edits whole tensors in {', '.join(hooks)}; set train.parallel: ddp (or auto)")
    if method_cls.stages_on_cpu:
        raise ConfigError(f"train.parallel: fsdp cannot shard the 4-bit weights of method {method_cls.name!r}; "
                          "set train.parallel: ddp (or auto)")
    if tc.optimizer != "adamw":
        raise ConfigError(f"train.optimizer: {tc.optimizer} does not step FSDP2's sharded parameters; "
                          "use adamw with train.parallel: fsdp, or train.parallel: ddp")
    if tc.chunked_ce is True:
        raise ConfigError("train.chunked_ce: the chunked loss reads the head's weight outside the head's forward, "
                          "which FSDP2 keeps sharded there; leave train.chunked_ce at auto (off under fsdp) or "
                          "set train.parallel: ddp")


def mode(tc, method, model: nn.Module, device: torch.device) -> str:
    """``none`` (one process), ``fsdp`` or ``ddp``. auto: ddp for methods whose hooks need whole tensors
    and wherever the unsharded weights, gradients and AdamW states take at most half the device's memory
    (the host's on the CPU: always), else fsdp."""
    if not context().joined:
        return "none"
    if tc.parallel != "auto":
        return tc.parallel
    from ..methods.registry import Method
    if any(getattr(type(method), h) is not getattr(Method, h) for h in _WHOLE_TENSOR_HOOKS) or \
            type(method).stages_on_cpu or tc.optimizer != "adamw" or device.type != "cuda":
        return "ddp"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * (p.element_size() + 8) for p in model.parameters() if p.requires_grad)
    if tc.memory_limit:
        from ..config import parse_bytes
        budget = parse_bytes(tc.memory_limit)
    else:
        budget = torch.cuda.get_device_properties(device).total_memory
    return "ddp" if weights + trained <= budget / 2 else "fsdp"


def resolved_train(tc, run_mode: str):
    """The train section as this process runs it: the progress bar on rank 0 only, the chunked loss off
    under fsdp (it reads the head's weight outside the head's forward)."""
    update = {} if context().main else {"progress": False}
    if run_mode == "fsdp" and tc.chunked_ce == "auto":
        update["chunked_ce"] = False
    return tc.model_copy(update=update) if update else tc


@dataclass
class ShardedBatches(Batches):
    """Batches of rank ``rank`` of ``world``: global micro-batch k holds ``world × batch_size`` examples
    in the order one process of that batch size would draw, and rank r takes the r-th contiguous part
    (packed rows: rank r takes rows r, r + world, ...). Evaluation (``iterate``) is not sharded."""
    rank: int = 0
    world: int = 1

    def _groups(self, epoch: int, shuffle: bool) -> list[list[int]]:
        if self.packed_tokens:
            rows = super()._groups(epoch, shuffle)
            return rows[self.rank:len(rows) // self.world * self.world:self.world]
        out = []
        for g in batch_indices(len(self.dataset), self.batch_size * self.world, seed=self.seed, epoch=epoch,
                               shuffle=shuffle):
            if len(g) >= self.world:   # a tail too short for every rank to get an example is dropped
                out.append([list(p) for p in _split(g, self.world)][self.rank])
        return out

    def per_epoch(self) -> int:
        return len(self.order(0))

    def locate(self, micro: int) -> tuple[int, int]:
        if self.packed_tokens:
            return super().locate(micro)
        return micro // self.per_epoch(), micro % self.per_epoch()

    def iterate(self, limit: int | None = None):
        whole = Batches(self.dataset, self.batch_size * self.world, self.seed, self.pad_id, self.device,
                        shuffle=self.shuffle, packed_tokens=self.packed_tokens)
        yield from whole.iterate(limit)

    def unsharded(self) -> Batches:
        """Every example, in batches of this process's size (for a method's ``prepare``: the same on every rank)."""
        return Batches(self.dataset, self.batch_size, self.seed, self.pad_id, self.device, shuffle=self.shuffle,
                       packed_tokens=self.packed_tokens)


def _split(items: list, parts: int) -> list[list]:
    k, extra = divmod(len(items), parts)
    bounds = [i * k + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


class Single:
    """One process: the loop's collectives do nothing."""
    world = 1

    def total(self, n: int) -> int:
        return n

    def before_backward(self, model: nn.Module, last: bool) -> None:
        pass

    def sync_grads(self, params) -> None:
        pass

    def reduce(self, totals: list, sums: dict) -> tuple[list, dict]:
        return totals, sums


class _Collectives(Single):
    """Gradients are averaged over the processes (as FSDP2 does; gloo has no pre-multiplied sum to make
    it add), so the step's item count comes back divided by the world size, which multiplies each
    process's loss by it, and a method's regularization term, the same on every process, keeps its
    weight. The logged sums are divided to match."""

    def __init__(self, device: torch.device):
        self.world = context().world
        self.device = device if device.type == "cuda" else torch.device("cpu")

    def total(self, n: int) -> float:
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item()) / self.world

    def reduce(self, totals: list, sums: dict) -> tuple[list, dict]:
        """The step's loss sum and extra sums over all processes, divided by the world size (one all-reduce)."""
        keys = sorted(sums)
        flat = torch.stack([sum(t.double() for t in totals).to(self.device).reshape(())] +
                           [torch.as_tensor(sums[k], dtype=torch.float64, device=self.device).reshape(()) for k in keys])
        dist.all_reduce(flat)
        flat /= self.world
        return [flat[0]], {k: flat[i + 1] for i, k in enumerate(keys)}


class Replicated(_Collectives):
    """ddp: whole model on every process; gradients averaged in one bucketed all-reduce per step."""

    def sync_grads(self, params) -> None:
        # a parameter may get a gradient on some processes only (an expert no token of this shard reached):
        # it gets zeros where it has none, so that every process reduces the same tensors
        params = list(params)
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has)
        for p, n in zip(params, has.tolist()):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, n in zip(params, has.tolist()) if n]
        by_dtype: dict = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat /= self.world
            for g, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                g.copy_(synced)


class Sharded(_Collectives):
    """fsdp: FSDP2 reduce-scatters (and averages) in the last micro-batch's backward only."""

    def before_backward(self, model: nn.Module, last: bool) -> None:
        model.set_requires_gradient_sync(last)


def parallelize(model: nn.Module, run_mode: str, precision: str, device: torch.device) -> Single:
    """Apply ``run_mode`` to ``model`` in place (after checkpointing and compile, before the optimizer
    exists) and return the loop's collectives."""
    if run_mode == "none":
        return Single()
    if run_mode == "ddp":
        for p in model.parameters():   # the same start everywhere, even for weights drawn after the seed
            dist.broadcast(p.data, src=0)
        return Replicated(device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from ..models.targets import find_blocks
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.register_forward_hook(_reshard_without_grad)
    return Sharded(device)


def _reshard_without_grad(model, args, output):
    """FSDP2 keeps the root's parameters whole after its forward, for the backward that follows; after
    a forward without gradients (evaluation) there is none, and ``model.parameters()`` must give the
    sharded parameters again (the loop and the optimizer hold those)."""
    if not torch.is_grad_enabled():
        model.reshard()


def fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under fsdp, the whole model on rank 0 while the block runs (a collective): its parameters
    unsharded, and its ``state_dict()`` the full one on the host (FSDP2's own gives shards), so that
    rank 0 saves exactly what a single-process run saves. Elsewhere nothing happens."""
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for m in mods:
        m.unshard()
    if context().main:
        model.state_dict = lambda *args, **kwargs: dict(full)   # this instance only, until the block ends
    try:
        yield
    finally:
        model.__dict__.pop("state_dict", None)
        for m in mods:
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def broadcast(obj):
    """Rank 0's ``obj`` on every process (itself with one process)."""
    if context().world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every process."""
    if context().world == 1:
        return [obj]
    out = [None] * context().world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if context().world > 1:
        dist.barrier()


def train_batches(dataset, batch_size: int, seed: int, pad_id: int, device, packed_tokens) -> Batches:
    """This process's training batches: sharded by rank with more than one process."""
    ctx = context()
    if not ctx.joined:
        return Batches(dataset, batch_size, seed, pad_id, device, packed_tokens=packed_tokens)
    return ShardedBatches(dataset, batch_size, seed, pad_id, device, packed_tokens=packed_tokens,
                          rank=ctx.rank, world=ctx.world)


def whole(batches: Batches) -> Batches:
    return batches.unsharded() if isinstance(batches, ShardedBatches) else batches


class ReadOnlyLog:
    """metrics.jsonl as the other ranks see it: read, never written (rank 0 writes it)."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = path

    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        from .report import MetricsLog
        return MetricsLog(self.path).read()
