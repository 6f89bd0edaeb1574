"""tunesmith's own dispatcher operators (``torch.ops.tunesmith.*``), opaque to torch.compile.

Each is defined with a plain dispatcher kernel (CompositeExplicitAutograd) and a fake kernel for
tracing. ``torch.library.custom_op`` would do the same, but its Python wrapper costs host time on
every call (``lora_output`` on tiny tensors, one CPU core: 68 µs defined that way, 26 µs defined
here, 16 µs as a plain Python function), and a compiled 8B LoRA step calls these operators some 650
times. The LoRA products are called inside autograd functions and need no autograd formula;
``kept`` passes gradients through.

``alias`` gives an ATen operator a tunesmith name with the same arguments and kernel but none of its
tags, returning only its tensor outputs (kernels/compile.py renames attention called without
dropout, which is not random).
"""
from __future__ import annotations

from typing import Callable

import torch

_LIB = torch.library.Library("tunesmith", "DEF")


def define(schema: str, kernel: Callable, fake: Callable, backward: Callable | None = None) -> torch._ops.OpOverload:
    """Define ``tunesmith::<schema>`` with ``kernel`` for every device and ``fake`` for tracing, and
    ``backward(ctx, grad)`` as its gradient if given; returns the operator overload (called directly:
    the packet's overload lookup costs host time too)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tunesmith::{name}", fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(f"tunesmith::{name}", backward, lib=_LIB)
    return getattr(torch.ops.tunesmith, name).default


def alias(name: str, op: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, tuple[int, ...]]:
    """``tunesmith::<name>``: ``op``'s arguments and kernel (for every device, and for tracing) without
    its tags, returning only its tensor outputs (sizes among them are known once a graph is traced).
    Returns the operator and the indices of ``op``'s outputs it returns. It has no autograd formula:
    it is meant for graphs that are already differentiated."""
    returns = op._schema.returns
    keep = tuple(i for i, r in enumerate(returns) if isinstance(r.type, torch.TensorType))
    schema = str(op._schema)
    arguments = schema[schema.index("("):schema.rindex(" -> ")]
    _LIB.define(f"{name}{arguments} -> ({', '.join('Tensor ' + returns[i].name for i in keep)})")

    def kernel(*args, **kwargs):
        out = op(*args, **kwargs)
        return tuple(out[i] for i in keep) if len(keep) > 1 else out[keep[0]]
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tunesmith::{name}", kernel, lib=_LIB)
    return getattr(torch.ops.tunesmith, name).default, keep
