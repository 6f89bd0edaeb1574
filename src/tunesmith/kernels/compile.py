"""torch.compile of a model's transformer blocks (decoder or encoder layers), one block at a time.

Each layer compiles to one graph (the fused LoRA op switches to its traceable form while being
compiled, see kernels/lora.py); identical layers share the compiled code, so an 8B model compiles
once, in seconds. Inductor fuses RMSNorm, RoPE, SwiGLU and the residual adds around the GEMMs and
removes most kernel launches. Reference: the same layers uncompiled.

What each compiled block keeps for backward is set by a selective-checkpoint policy inside its graph:

* Blocks that are not checkpointed keep the outputs of matrix products and attention; the compiler
  may recompute the elementwise rest (norms, SwiGLU, RoPE) where that saves memory, and the
  dequantized weights of a 4-bit base (QLoRA) are always recomputed from the 4-bit weight, as the
  eager fused op does. Left to itself the compiler would keep each dequantized weight (0.4 GiB a
  layer at 8B: the dequantization is opaque to it) and fp32 intermediates of the norms. With the
  policy, bench/gpu_train.py on an H100 80GB: 8B QLoRA keeps 0.33 GiB a block instead of 0.91, and 1B
  full fine-tuning peaks at 15.4 GiB instead of 18.4, at the same speed.
* Checkpointed blocks checkpoint inside the graph (transformers' own flag is turned off): from
  outside, the checkpoint would rerun the block's whole compiled forward in backward, while inside
  it the partitioner recomputes only what backward reads. The last projection's product feeds
  nothing in backward and is not recomputed (27% of a Llama block's recomputed GEMM FLOPs).
  Where that projection's backward does read its output (DoRA's magnitude gradient), the block's last
  adapted projection (in module order; a Llama block's down projection) is asked to keep it
  (``keep_output``): at 8B and 4,096 tokens a step, 32 MiB a block instead of a 0.65 ms GEMM.
  Checkpointed blocks also keep their narrow products (LoRA's x Aᵀ, ``_narrow``): recomputing one
  reads its whole (tokens × width) input again, keeping it costs its few columns.

Attention is tagged as a random operator (it takes a dropout probability), so when a checkpointed
block recomputes it the compiler saves and restores the generator's state around each call, in
Python, in forward and again in backward, and inductor's C++ wrapper refuses the graph. A joint-graph
pass (``SeedlessAttention``) renames attention called with dropout 0 to an untagged alias
(``tunesmith::seedless_*``, the same kernel): it draws no random numbers, and the recomputation is
exact without the state. With dropout the call keeps its tag and its saved state.

A second joint-graph pass (``shared_operand_products``) merges small products that read one large
operand: LoRA's x Aᵀ of q, k and v (and of gate and up) become one product with the three A side by
side, and so do their A gradients guᵀ x in backward, so the block reads its normed input once instead
of once a projection. A third (``summed_input_gradients``) sums the input gradients of those
projections in one buffer (``lora_input_grad_sum``): one rank-Σr product writes it and every base
product accumulates into it, instead of each projection writing its own (tokens × width) gradient
for a later kernel to read back and add: a block's backward writes and reads three such gradients
fewer and runs three rank products fewer. Every compiled block also gets inductor's combo kernels,
which launch independent small kernels (the casts of a block's adapter weights and of their
gradients) as one: about 1% faster on the offloaded 8B LoRA step of bench/gpu_train.py.

With ``train.offload_activations`` every tensor a compiled block keeps goes to host memory
(kernels/offload.py), so blocks outside ``train.checkpoint_layers`` keep their products there.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models.compat import CACHE_NAMES
from ..models.targets import find_blocks
from .dora import kept
from .lora import lora_input_grad, lora_input_grad_sum, lora_output
from .ops import alias

#: Operator namespaces whose outputs are dequantized weights (recomputed, never saved).
DEQUANT_NAMESPACES = {"bitsandbytes"}


_aten = torch.ops.aten
#: Kept for backward in blocks that are not checkpointed: the expensive ops' outputs.
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, lora_output}
#: Kept in every block: small results that are expensive to recompute, marked with ``kept`` (DoRA's
#: row norms, which read the whole frozen weight).
SMALL_OPS = {kept}
#: The scaled-dot-product attention operators (CUDA) that SDPA dispatches to.
_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_efficient_attention")
for _name in _SDPA + ("_flash_attention_forward", "_efficient_attention_forward"):
    if hasattr(_aten, _name):
        SAVED_OPS.add(getattr(_aten, _name).default)


#: Attention operators that take a dropout probability -> (untagged alias, the outputs it returns).
SEEDLESS = {}
for _name in _SDPA + ("_scaled_dot_product_flash_attention_for_cpu",):
    _op = getattr(getattr(_aten, _name, None), "default", None)
    if _op is not None and torch.Tag.nondeterministic_seeded in _op.tags:
        SEEDLESS[_op] = alias("seedless" + _name, _op)


def _dropout_p(node: torch.fx.Node) -> float:
    args = node.target._schema.arguments
    i = next(j for j, a in enumerate(args) if a.name == "dropout_p")
    return node.args[i] if len(node.args) > i else node.kwargs.get("dropout_p", args[i].default_value)


def seedless_attention(graph: torch.fx.Graph) -> int:
    """Rename each attention call with dropout_p == 0 to its untagged alias (``SEEDLESS``); the sizes it
    returns besides its tensors (flash and cuDNN attention's max_q, max_k) become the constants they
    are in a traced graph. Calls whose sizes are symbolic keep their operator. Returns how many."""
    renamed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SEEDLESS or _dropout_p(node) != 0:
            continue
        new, keep = SEEDLESS[node.target]
        val, users = node.meta.get("val"), list(node.users)
        dropped = [i for i in range(len(node.target._schema.returns)) if i not in keep]
        if (val is None or any(type(val[i]) is not int for i in dropped)
                or any(u.target is not operator.getitem for u in users)):
            continue
        for u in users:
            i = u.args[1]
            if i in keep and len(keep) > 1:
                u.args = (node, keep.index(i))
                continue
            if i in keep:                 # the alias returns its one tensor, not a tuple
                u.replace_all_uses_with(node)
                graph.erase_node(u)
                continue
            for user in list(u.users):
                user.args = torch.fx.node.map_arg(user.args, lambda n, u=u, i=i: val[i] if n is u else n)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n, u=u, i=i: val[i] if n is u else n)
            graph.erase_node(u)
        node.target = new
        node.meta["val"] = tuple(val[i] for i in keep) if len(keep) > 1 else val[keep[0]]
        renamed += 1
    return renamed


#: Widest side of a small product that ``shared_operand_products`` groups (LoRA ranks and their sums).
GROUP_MAX = 64
_VIEWS = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default}


def _source(node: torch.fx.Node):
    """The node ``node`` is a view of (through reshapes), and its shape: views of one tensor in one
    shape are the same operand."""
    base = node
    while isinstance(base, torch.fx.Node) and base.op == "call_function" and base.target in _VIEWS:
        base = base.args[0]
    return base, tuple(d if isinstance(d, int) else str(d) for d in node.meta["val"].shape)  # symbolic sizes by name


def _small(d, other) -> bool:
    """Whether a product's outer size ``d`` is small beside ``other``, the shared operand's: ``d`` a
    known size of at most ``GROUP_MAX``, ``other`` larger or symbolic (a token count)."""
    return type(d) is int and d <= GROUP_MAX and (type(other) is not int or d < other)


def _reaches(starts, targets: set) -> bool:
    """Whether any of ``targets`` is an input, direct or not, of a node in ``starts``."""
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def shared_operand_products(graph: torch.fx.Graph) -> int:
    """Merge small matrix products that read the same large operand into one product.

    A LoRA block computes x Aᵀ for q, k and v (and for gate and up) from one normed input x, and in
    backward guᵀ x for each again: every product is bound by reading x (tokens × width), not by its
    rank-16 arithmetic. ``mm(X, R_i)`` with one X and each R_i at most ``GROUP_MAX`` columns wide
    becomes ``mm(X, cat(R_i, 1))`` and column slices; ``mm(L_i, X)`` with each L_i at most
    ``GROUP_MAX`` rows becomes ``mm(cat(L_i, 0), X)`` and row slices. X is read once instead of once a
    projection. New nodes carry the metadata of the products they replace (their checkpoint policy
    among it). Returns how many products were merged away."""
    from torch._guards import detect_fake_mode
    from torch._inductor.pattern_matcher import stable_topological_sort

    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not _aten.mm.default:
            continue
        a, b = node.args
        if not all(isinstance(t, torch.fx.Node) and "val" in t.meta for t in (a, b)):
            continue
        (m, _), (_, k) = a.meta["val"].shape, b.meta["val"].shape
        if _small(k, m):
            groups.setdefault((0, _source(a)), []).append(node)      # X (N, d) @ R (d, r)
        if _small(m, k):
            groups.setdefault((1, _source(b)), []).append(node)      # L (r, N) @ X (N, d)
    merged, gone = 0, set()
    for (side, _), nodes in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        nodes = [n for n in nodes if n not in gone]
        if len(nodes) < 2:
            continue
        shared = nodes[0].args[side]
        parts = [n.args[1 - side] for n in nodes]
        widths = [p.meta["val"].shape[1 - side] for p in parts]
        if len({p.meta["val"].dtype for p in parts}) != 1 or _reaches(parts, set(nodes)):
            continue
        fake = detect_fake_mode([p.meta["val"] for p in parts] + [shared.meta["val"]])
        with graph.inserting_before(nodes[0]):
            cat = graph.call_function(_aten.cat.default, ([*parts], 1 - side))
            mm = graph.call_function(_aten.mm.default, (shared, cat) if side == 0 else (cat, shared))
            with fake:
                cat.meta["val"] = torch.cat([p.meta["val"] for p in parts], 1 - side)
                mm.meta["val"] = torch.mm(*((shared.meta["val"], cat.meta["val"]) if side == 0
                                            else (cat.meta["val"], shared.meta["val"])))
            for new in (cat, mm):
                new.meta.update({k: v for k, v in nodes[0].meta.items() if k not in ("val", "tensor_meta")})
            start = 0
            for n, w in zip(nodes, widths):
                piece = graph.call_function(_aten.slice.Tensor, (mm, 1 - side, start, start + w))
                with fake:
                    piece.meta["val"] = mm.meta["val"].narrow(1 - side, start, w)
                piece.meta.update({k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta")})
                n.replace_all_uses_with(piece)
                start += w
        for n in nodes:
            graph.erase_node(n)
        gone.update(nodes)
        merged += len(nodes) - 1
    if merged:
        stable_topological_sort(graph)   # each part computed before the merged product reads it
        graph.lint()
    return merged


def _is_add(node) -> bool:
    """A plain two-tensor ``add`` of equal shapes (no alpha, no broadcast)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is _aten.add.Tensor
            and len(node.args) == 2 and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args)):
        return False
    shapes = [a.meta.get("val") for a in (*node.args, node)]
    return (all(isinstance(v, torch.Tensor) for v in shapes)
            and len({tuple(d if isinstance(d, int) else str(d) for d in v.shape) for v in shapes}) == 1)


def _input_grad(leaf):
    """The ``lora_input_grad`` node that ``leaf`` is (or is the only view of), used nowhere else, whose
    frozen weight is a graph input; else None. (A computed weight, a dequantized 4-bit one, is left
    alone: merged, every projection's dequantized weight would be alive at once.)"""
    node = leaf
    if node.op == "call_function" and node.target in _VIEWS and len(node.users) == 1:
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is lora_input_grad
            and len(node.users) == 1):
        return None
    return node if node.args[1].op == "placeholder" else None


def summed_input_gradients(graph: torch.fx.Graph) -> int:
    """Merge the input gradients of projections that read one input into one buffer.

    q, k and v (and gate and up) read the same normed input, so backward sums their input gradients
    gᵢ W0ᵢ + guᵢ Aᵢ. Each ``lora_input_grad`` writes its own (tokens × width) buffer, and the sum
    reads them all back. ``lora_input_grad_sum`` writes one buffer with a single rank-Σr product and
    accumulates every base product into it: two buffers fewer to write and read for q, k and v, one
    for gate and up, and two rank products fewer. Other terms of the sum stay added to the result.
    Returns how many input gradients were merged away."""
    from torch._guards import detect_fake_mode

    merged = 0
    for root in list(graph.nodes):
        if root.graph is not graph or not _is_add(root):
            continue
        if len(root.users) == 1 and _is_add(next(iter(root.users))):
            continue                                    # expanded from the add that uses it
        leaves, inner, stack = [], [], [root]
        while stack:
            for a in stack.pop().args:
                if _is_add(a) and len(a.users) == 1:
                    inner.append(a)
                    stack.append(a)
                else:
                    leaves.append(a)
        grads = {leaf: _input_grad(leaf) for leaf in leaves}
        parts = [leaf for leaf in leaves if grads[leaf] is not None]
        nodes = [grads[leaf] for leaf in parts]
        if len(nodes) < 2 or len({n.meta["val"].dtype for n in nodes}) != 1 or len(set(nodes)) != len(nodes):
            continue
        fake = detect_fake_mode([n.meta["val"] for n in nodes])
        meta = {k: v for k, v in root.meta.items() if k not in ("val", "tensor_meta")}
        with graph.inserting_before(root):
            new = []
            gu = graph.call_function(_aten.cat.default, ([n.args[2] for n in nodes], 1))
            a = graph.call_function(_aten.cat.default, ([n.args[3] for n in nodes], 0))
            total = graph.call_function(lora_input_grad_sum, ([n.args[0] for n in nodes], [n.args[1] for n in nodes], gu, a))
            new += [gu, a, total]
            first = parts[0]
            if first is not nodes[0]:                   # the view the gradients are summed in
                total = graph.call_function(first.target, (total, *first.args[1:]), dict(first.kwargs))
                new.append(total)
            for leaf in leaves:
                if grads[leaf] is None:
                    total = graph.call_function(_aten.add.Tensor, (total, leaf))
                    new.append(total)
        for n in new:
            with fake:
                args = torch.fx.node.map_arg(n.args, lambda m: m.meta["val"])
                kwargs = torch.fx.node.map_arg(n.kwargs, lambda m: m.meta["val"])
                n.meta["val"] = n.target(*args, **kwargs)
            n.meta.update(meta)
        root.replace_all_uses_with(total)
        for n in [root, *inner, *(p for p in parts if p not in nodes), *nodes]:
            graph.erase_node(n)
        merged += len(nodes) - 1
    if merged:
        graph.lint()
    return merged


class BlockPasses(CustomGraphPass):
    """Joint-graph passes of every compiled block: ``seedless_attention``, ``shared_operand_products``,
    ``summed_input_gradients``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        seedless_attention(graph)
        shared_operand_products(graph)
        summed_input_gradients(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


#: Inductor options every compiled block gets (combo kernels: see the module docstring).
BLOCK_OPTIONS = {"joint_custom_pre_pass": BlockPasses(), "combo_kernels": True}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SMALL_OPS:
        return CheckpointPolicy.MUST_SAVE
    if getattr(op, "namespace", None) in DEQUANT_NAMESPACES:
        return CheckpointPolicy.MUST_RECOMPUTE
    if op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _narrow(op, args) -> bool:
    """A matrix product whose output is at most ``GROUP_MAX`` columns wide and narrower than the input
    it reads (LoRA's x Aᵀ): recomputing it reads that whole input again, keeping it costs its few
    columns."""
    if op is not _aten.mm.default or len(args) < 2:
        return False
    x, r = args[0], args[1]
    return isinstance(x, torch.Tensor) and isinstance(r, torch.Tensor) and _small(r.shape[1], x.shape[1])


def _recompute_all(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # spelled out: some torch versions keep opaque operators' outputs under a plain checkpoint
    if op in SMALL_OPS or _narrow(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_RECOMPUTE


def _checkpoint_inside(layer: nn.Module, checkpointed: bool) -> None:
    """Run ``layer``'s training forward under non-reentrant checkpointing inside its compiled graph:
    all of it recomputed (``checkpointed``), or only what ``_policy`` lets go."""
    forward = layer.forward
    if checkpointed:
        layer.gradient_checkpointing = False   # not wrapped a second time from outside the graph
    policy = _recompute_all if checkpointed else _policy
    context = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()) or not (checkpointed or torch.compiler.is_compiling()):
            return forward(*args, **kwargs)  # uncompiled, the fused op keeps no dequantized weight anyway
        # no KV cache while training: a checkpointed block would write it twice, and writing it inside
        # the graph breaks it (transformers drops it for the blocks it checkpoints in the same way)
        for key in (*CACHE_NAMES, "layer_past"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)
    layer.forward = run


def compile_decoder_layers(model: nn.Module, mode: str | None = None, options: dict | None = None) -> int:
    """Compile every transformer block of a transformers model in place; returns how many.
    ``mode``: torch.compile's mode (None: the default); ``options``: inductor options on top of it
    (and of ``BLOCK_OPTIONS``)."""
    from torch._inductor import list_mode_options
    options = {**(list_mode_options(mode) if mode else {}), **BLOCK_OPTIONS, **(options or {})}
    _, layers = find_blocks(model)
    # a block may set state outside its graph and restore it before returning (transformers >= 5.25
    # routes each model's hub-kernel functions through a context variable of the `kernels` package):
    # its checkpoint need not replay that in backward, and tracing it then does not break the graph
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        for module in layer.modules():  # caches filled outside the graph (a side effect inside it breaks it)
            if hasattr(module, "before_compile"):
                module.before_compile()
        checkpointed = getattr(layer, "gradient_checkpointing", False)
        last = [m for m in layer.modules() if hasattr(m, "keep_output")]
        if checkpointed and last:
            last[-1].keep_output = True
        _checkpoint_inside(layer, checkpointed)
        layer.compile(options=options)
        offload = getattr(layer, "activation_offload", None)   # set by train.accel.enable_checkpointing
        if offload is not None:  # its hooks run around the compiled call, never inside the graph
            layer._compiled_call_impl = offload.block(layer._compiled_call_impl)
    return len(layers)
