"""Activation offload: what a checkpointed layer keeps for backward (its input) waits in pinned host
memory instead of GPU memory (``train.offload_activations``).

With full activation checkpointing each decoder layer keeps one tensor, its input hidden states
(batch × sequence × width). At long context those dominate GPU memory: 8B Llama at 150k tokens
keeps 32 × 1.2 GB. Offloading moves each one to the host as soon as it is saved and brings it back
when backward reaches the layer.

The copies run on a side stream, so compute never waits for them in forward; the device memory of
a tensor returns to the allocator once its copy is done (``record_stream``). In backward, bringing
back layer i's input also starts the copy of layer i-1's, one layer ahead of use.

Compiled blocks (``train.compile``) are offloaded whole: every tensor a compiled block keeps for
backward goes to the host, in a block that recomputes only its input, in one that is not checkpointed
(``train.checkpoint_layers``) also its matrix products. Backward then reads a block's products back
from the host instead of recomputing them, which pays where the copies hide behind compute. A
Llama-8B block's products at 4,096 tokens are 386 MB: about 7 ms each way over a 54 GB/s host link
(bench/gpu_pcie.py on an H100 80GB), against about 3.8 ms for the block's forward and 8 ms for its
recomputation and backward. Bringing back any tensor of a block brings back the whole block and
starts the copies of the block before it.

Reference: ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` places the same tensors in the
same memory, but copies on the compute stream, so every copy stalls the step. Both give the same
gradients bit for bit (the tensors round-trip unchanged); tests/test_checkpointing.py checks that.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch

MIN_BYTES = 1 << 16  # smaller tensors stay where they are (not worth a copy)
BLOCK_MIN_BYTES = 1 << 20  # the same inside a compiled block (LoRA's (tokens, r) products stay)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps in some order of its dimensions (a copy
    to a buffer of the same strides is then one block copy)."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _unregister(buffers: list[torch.Tensor]) -> None:
    for t in buffers:
        try:
            torch.cuda.cudart().cudaHostUnregister(t.untyped_storage().data_ptr())
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be gone
            pass
    buffers.clear()


class _HostPool:
    """Pinned host buffers of exact sizes, reused from step to step. (torch's pinned allocator rounds
    each block up to a power of two: 31 layer inputs of 2.5 GB would take 124 GB of host memory.)
    Page-locked with cudaHostRegister once, when first made. A buffer goes back to the pool when its
    entry dies (the autograd graph that saved it is freed after backward); its last copy and the
    buffer's next one both run on the offload stream, so they stay ordered."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.made = 0
        self.registered: list[torch.Tensor] = []
        # unregistered when the pool dies, before the memory goes back to the host allocator (a later
        # registration of the same addresses would otherwise fail with "resource already mapped")
        weakref.finalize(self, _unregister, self.registered)

    def take(self, shape, stride, dtype) -> torch.Tensor:
        """A buffer of ``shape`` and ``dtype`` laid out with ``stride``."""
        key = (tuple(shape), tuple(stride), dtype)
        stack = self.free.get(key)
        if stack:
            return stack.pop()
        self.made += 1
        t = torch.empty_strided(shape, stride, dtype=dtype)
        if t.numel():
            nbytes = t.untyped_storage().nbytes()
            err = torch.cuda.cudart().cudaHostRegister(t.untyped_storage().data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"train.offload_activations: cannot page-lock {nbytes} "
                                   f"bytes of host memory (CUDA error {int(err)}); set it to false")
            self.registered.append(t)
        return t

    def give(self, t: torch.Tensor) -> None:
        self.free.setdefault((tuple(t.shape), tuple(t.stride()), t.dtype), []).append(t)


class _Group:
    """The tensors one block saved (one tensor per group where blocks are not grouped); ``prev``: the
    group saved before it, which backward needs next; ``pending``: (entry, tensor) pairs whose copies
    start together when the block returns. Entries are held weakly: the autograd graph owns them, and
    a cycle here would keep their host buffers out of the pool until a collection."""
    __slots__ = ("entries", "prev", "pending")

    def __init__(self, prev):
        self.entries, self.prev, self.pending = [], prev, []


class _Entry:
    __slots__ = ("host", "device", "copied", "gpu", "ready", "used", "group", "pool", "__weakref__")

    def __init__(self, host, device, group, pool):
        self.host, self.device, self.group, self.pool = host, device, group, pool
        self.copied = self.gpu = self.ready = None
        self.used = False

    def __del__(self):
        if self.host is not None:
            self.pool.give(self.host)


class ActivationOffload:
    """``saved_tensors_hooks`` that keep eligible saved tensors in pinned host memory.

    Eligible: CUDA floating-point tensors of at least ``min_bytes`` that require grad (layer inputs;
    the rotary tables and masks that every layer shares stay on the GPU), or, inside a compiled block
    (``block``), that are not stored with a parameter (``params``: the model's parameters, read at
    the first step, once the model sits where it trains)."""

    def __init__(self, min_bytes: int = MIN_BYTES, params: Callable | None = None):
        self.min_bytes = min_bytes
        self.params = params
        self.frozen: set[int] | None = None
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.last: _Group | None = None   # the group packed last: backward meets it first
        self.open: _Group | None = None   # the compiled block being run, if any
        self.pool = _HostPool()
        self._hooks = None

    def new_step(self) -> None:
        """Forget the packing order (called as each forward begins): older graphs still unpack, only
        without prefetch."""
        self.last = None
        if self.frozen is None:
            self.frozen = {p.untyped_storage().data_ptr() for p in self.params()} if self.params else set()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def eligible(self, t: torch.Tensor) -> bool:
        least = self.min_bytes if self.open is None else max(self.min_bytes, BLOCK_MIN_BYTES)
        if not (t.is_cuda and t.is_floating_point() and t.numel() * t.element_size() >= least):
            return False
        if not _dense(t):
            return False  # its layout could not come back as it was (a compiled backward checks strides)
        if self.open is not None:
            return t.untyped_storage().data_ptr() not in (self.frozen or ())
        return t.requires_grad

    def pack(self, t: torch.Tensor):
        if not self.eligible(t):
            return t
        group = self.open if self.open is not None else _Group(self.last)
        host = self.pool.take(t.shape, t.stride(), t.dtype)   # t's layout: backward gets it back as it was
        entry = _Entry(host, t.device, group, self.pool)
        group.entries.append(weakref.ref(entry))
        group.pending.append((entry, t))
        if self.open is None:   # a lone tensor: copied now; a compiled block's: when the block returns
            self.last = group
            self._copy_out(group)
        return entry

    def _copy_out(self, group: _Group) -> None:
        """Start the copies of ``group``'s pending tensors on the side stream, after the compute stream's
        work so far (which produced them); one event marks them all done."""
        pending, group.pending = group.pending, []
        if not pending:
            return
        device = pending[0][0].device
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for e, t in pending:
                e.host.copy_(t, non_blocking=True)
            copied = stream.record_event()
        for e, t in pending:
            t.record_stream(stream)   # t's memory is not reused before the copy has read it
            e.copied = copied

    def _fetch(self, entries: list[_Entry]) -> None:
        """Start bringing ``entries`` back to the GPU on the side stream; one event marks them all ready."""
        if not entries:
            return
        stream = self._stream(entries[0].device)
        with torch.cuda.stream(stream):
            for event in {id(e.copied): e.copied for e in entries}.values():
                stream.wait_event(event)
            for e in entries:
                e.gpu = e.host.to(e.device, non_blocking=True)
            ready = stream.record_event()
        for e in entries:
            e.ready = ready

    @staticmethod
    def _waiting(group: _Group) -> list[_Entry]:
        live = (ref() for ref in group.entries)
        return [e for e in live if e is not None and e.gpu is None and not e.used]

    def unpack(self, e):
        if isinstance(e, torch.Tensor):
            return e
        group = e.group
        if e.gpu is None:   # with the rest of its block, which backward unpacks together
            self._fetch([e] + [x for x in self._waiting(group) if x is not e])
        prev, group.prev = group.prev, None
        if prev is not None:
            self._fetch(self._waiting(prev))  # the block before this one is unpacked next
        current = torch.cuda.current_stream(e.device)
        current.wait_event(e.ready)
        gpu, e.gpu, e.used = e.gpu, None, True
        gpu.record_stream(current)            # allocated on the side stream, used and freed on this one
        return gpu

    def hooks(self):
        if self._hooks is None:  # wrapped once: not traced, they run while compiled blocks run
            self._hooks = (torch.compiler.disable(self.pack), torch.compiler.disable(self.unpack))
        return torch.autograd.graph.saved_tensors_hooks(*self._hooks)

    def block(self, call: Callable) -> Callable:
        """``call`` (a compiled block) with everything it saves for backward offloaded as one group."""
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return call(*args, **kwargs)
            group = self.open = self.last = _Group(self.last)
            try:
                with self.hooks():
                    out = call(*args, **kwargs)
            finally:
                self.open = None
            self._copy_out(group)   # what the block saved, copied in one batch
            return out
        return run


def offloading(checkpoint_fn: Callable, offload: ActivationOffload | None) -> Callable:
    """``checkpoint_fn`` with the tensors it saves (the layer's inputs) offloaded by ``offload``;
    with None, torch's ``save_on_cpu`` (the reference, copies on the compute stream)."""
    def run(function, *args, **kwargs):
        ctx = offload.hooks() if offload is not None else torch.autograd.graph.save_on_cpu(pin_memory=True)
        with ctx if torch.is_grad_enabled() else contextlib.nullcontext():
            return checkpoint_fn(function, *args, **kwargs)
    return run
