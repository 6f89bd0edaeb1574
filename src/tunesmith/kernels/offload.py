"""Activation offload: what a checkpointed layer keeps for backward (its input) waits in pinned host
memory instead of GPU memory (``train.offload_activations``).

With full activation checkpointing each decoder layer keeps one tensor, its input hidden states
(batch × sequence × width). At long context those dominate GPU memory: 8B Llama at 150k tokens
keeps 32 × 1.2 GB. Offloading moves each one to the host as soon as it is saved and brings it back
when backward reaches the layer.

The copies run on a side stream, so compute never waits for them in forward; the device memory of
a tensor returns to the allocator once its copy is done (``record_stream``). In backward, bringing
back layer i's input also starts the copy of layer i-1's, one layer ahead of use.

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


def _unregister(buffers: list[torch.Tensor]) -> None:
    for t in buffers:
        try:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
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

    def take(self, shape, dtype) -> torch.Tensor:
        stack = self.free.get((tuple(shape), dtype))
        if stack:
            return stack.pop()
        self.made += 1
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
            if int(err) != 0:
                raise RuntimeError(f"train.offload_activations: cannot page-lock {t.numel() * t.element_size()} "
                                   f"bytes of host memory (CUDA error {int(err)}); set it to false")
            self.registered.append(t)
        return t

    def give(self, t: torch.Tensor) -> None:
        self.free.setdefault((tuple(t.shape), t.dtype), []).append(t)


class _Entry:
    __slots__ = ("host", "device", "copied", "gpu", "ready", "prev", "pool")

    def __init__(self, host, device, copied, prev, pool):
        self.host, self.device, self.copied, self.prev, self.pool = host, device, copied, prev, pool
        self.gpu = self.ready = None

    def __del__(self):
        if self.host is not None:
            self.pool.give(self.host)


class ActivationOffload:
    """``saved_tensors_hooks`` that keep eligible saved tensors in pinned host memory.

    Eligible: CUDA floating-point tensors that require grad and hold at least ``min_bytes`` (layer
    inputs; the rotary tables and masks that every layer shares stay on the GPU)."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.last: _Entry | None = None  # the entry packed last: backward meets it first
        self.pool = _HostPool()

    def new_step(self) -> None:
        """Forget the packing order (called as each forward begins): older graphs still unpack, only
        without prefetch."""
        self.last = None

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def eligible(self, t: torch.Tensor) -> bool:
        return (t.is_cuda and t.is_floating_point() and t.requires_grad
                and t.numel() * t.element_size() >= self.min_bytes)

    def pack(self, t: torch.Tensor):
        if not self.eligible(t):
            return t
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))   # t is computed before it is copied
        host = self.pool.take(t.shape, t.dtype)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            copied = stream.record_event()
        t.record_stream(stream)   # t's memory is not reused before the copy has read it
        self.last = _Entry(host, t.device, copied, self.last, self.pool)
        return self.last

    def _fetch(self, e: _Entry) -> None:
        stream = self._stream(e.device)
        with torch.cuda.stream(stream):
            stream.wait_event(e.copied)
            e.gpu = e.host.to(e.device, non_blocking=True)
            e.ready = stream.record_event()

    def unpack(self, e):
        if isinstance(e, torch.Tensor):
            return e
        if e.gpu is None:
            self._fetch(e)
        prev, e.prev = e.prev, None
        if prev is not None and prev.gpu is None:
            self._fetch(prev)                 # the layer before this one is unpacked next
        current = torch.cuda.current_stream(e.device)
        current.wait_event(e.ready)
        gpu, e.gpu = e.gpu, None
        gpu.record_stream(current)            # allocated on the side stream, used and freed on this one
        return gpu

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offloading(checkpoint_fn: Callable, offload: ActivationOffload | None) -> Callable:
    """``checkpoint_fn`` with the tensors it saves (the layer's inputs) offloaded by ``offload``;
    with None, torch's ``save_on_cpu`` (the reference, copies on the compute stream)."""
    def run(function, *args, **kwargs):
        ctx = offload.hooks() if offload is not None else torch.autograd.graph.save_on_cpu(pin_memory=True)
        with ctx if torch.is_grad_enabled() else contextlib.nullcontext():
            return checkpoint_fn(function, *args, **kwargs)
    return run
