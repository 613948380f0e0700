"""Per-layer activation checkpointing with one autograd node per layer.

torch.utils.checkpoint's non-reentrant mode (what transformers uses by default) hooks every tensor
a layer saves for backward: on the H100 machine's host that was ~2,800 pack/unpack hook calls per
Llama-3-8B step, ~0.1 s of Python, while the GPU waited. Here a decoder layer is one
autograd.Function: forward runs the layer without building a graph and saves only its positional
tensor inputs (the hidden states); backward re-runs the layer with gradients enabled from those
inputs, under the same RNG and autocast state, and backpropagates through the recomputed graph
(the "reentrant" scheme: adapter gradients are accumulated into `.grad` by that inner backward, so
use `loss.backward()`, not `torch.autograd.grad`, for the parameters inside checkpointed layers).

Layers whose inputs do not require grad (the first decoder layer after a frozen embedding) still
get an autograd node: a zero-size dummy input that requires grad is passed alongside.

Offloading (`enable(model, offload=True)`): what a checkpointed layer keeps — its input hidden
states, [tokens, hidden] in the model dtype (16 MiB per layer for Llama-3-8B at 2048 tokens, 2 GiB
over 32 layers at 8192) — is copied to pinned host memory on a side stream instead of staying on
the GPU. When backward reaches layer k it brings layer k's input back (already on its way if
prefetched) and starts the copy of layer k-1's on the side stream, so the transfer of one layer
overlaps the recomputation and backward of the next. Device memory then holds about two layers'
inputs instead of all of them. Without a GPU (or for tensors not on one) the inputs are simply
kept, as without offloading.

    qlora_ext.checkpointing.enable(model)   # transformers models; prepare() calls it
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref

import torch
from torch import Tensor


_phase = threading.local()


_calls = iter(range(1, 1 << 62))  # tokens of checkpointed calls


def phase() -> tuple[str, int] | None:
    """("forward", token) while a checkpointed layer runs its first (graph-less) forward,
    ("recompute", the same token) while its backward replays it, None elsewhere. Layers may pass
    values that depend only on the parameters (DoRA's weight norm) from the first to the second,
    keyed by the token: checkpointing itself relies on the parameters not changing in between."""
    return getattr(_phase, "value", None)


def recomputing() -> bool:
    """Whether a checkpointed layer's backward is replaying its forward right now. Only what the
    layer's backward reads matters then, not the layer's output (see fused_mlp's down projection)."""
    current = phase()
    return current is not None and current[0] == "recompute"


def first_forward() -> bool:
    """Whether a checkpointed layer is running its first (graph-less) forward right now."""
    current = phase()
    return current is not None and current[0] == "forward"


def remember(key, value, offload: bool = False) -> None:
    """In a checkpointed layer's first forward: keep `value` (something that depends only on the
    parameters, such as DoRA's weight norm, or an activation the recomputation can then skip) for
    its recomputation, which `replayed(key)` hands it to. Elsewhere a no-op. Values live on the
    layer's autograd node: freed with its graph, so a forward whose backward never runs leaks
    nothing. With `offload`, a CUDA tensor (or each CUDA tensor of a tuple) of a layer that
    offloads its input goes the same way: to pinned host memory now, back to the device when
    replayed (fetched ahead: see `prefetcher`, else as the layer's backward begins); elsewhere it
    stays on its device. The offloaded tensors of one tuple travel together: one host buffer,
    one copy back (see _Offloader.park_together)."""
    if first_forward():
        if offload and getattr(_phase, "offloading", False):
            if isinstance(value, tuple):
                value = _offloader.park_together(value)
            elif isinstance(value, Tensor) and _Offloader.wants(value):
                value = _offloader.park(value, chain=False)
        _phase.stash.setdefault(key, []).append(value)


def replayed(key):
    """In a checkpointed layer's recomputation: the values `remember(key, ...)` kept during its
    first forward, one per call and in call order; None elsewhere, or when none is left (the
    recomputation then computes the value afresh)."""
    current = phase()
    if current is None or current[0] != "recompute":
        return None
    kept = _phase.stash.get(key)
    if not kept:
        return None
    value = kept.pop(0)
    if isinstance(value, tuple):
        return _offloader.fetch_together(value)
    return _offloader.fetch(value) if isinstance(value, _Parked) else value


def offloading() -> bool:
    """Whether the checkpointed layer running its first forward now offloaded its input to host
    memory (so that what it remembers with offload=True goes there too)."""
    return first_forward() and getattr(_phase, "offloading", False)


def _parked_in(stash: dict) -> list:
    parked = (t.parked if isinstance(t, _Member) else t for values in stash.values() for value in values
              for t in (value if isinstance(value, tuple) else (value,)))  # fmt: skip
    return list({id(t): t for t in parked if isinstance(t, _Parked)}.values())


def prefetcher():
    """In a checkpointed layer's recomputation: a function that starts bringing back what the
    layer backward reaches next (the one run before it) remembered in host memory, for a point of
    this layer's backward after its peak of device memory (attention_replay calls it once the MLP
    half's backward is done); None elsewhere. Without it the values come back as that layer's
    backward begins, which its recomputation then waits for."""
    if not recomputing():
        return None
    earlier = getattr(_phase, "earlier_stash", None)
    if earlier is None:
        return None

    def prefetch():
        stash = earlier()
        for parked in _parked_in(stash) if stash is not None else ():
            _offloader.prefetch(parked)

    return prefetch


_unused = threading.local()


@contextlib.contextmanager
def outputs_unused():
    """Marks projections run inside as feeding only values the recomputation replays (see
    attention_replay): their outputs' values are never read, only their backward. Units that can
    (fused_qkv's LoRA unit, the LoRA linear) then skip their base GEMM and keep what their backward
    reads; the others compute as usual. Only within a checkpointed layer's recomputation."""
    previous = getattr(_unused, "value", False)
    _unused.value = recomputing()
    try:
        yield
    finally:
        _unused.value = previous


def projection_outputs_unused() -> bool:
    """Whether a projection running now may skip computing its output (see outputs_unused)."""
    return getattr(_unused, "value", False) and recomputing()


#: Whether a checkpointed layer keeps its first forward's parameter casts (kept_constant) for its
#: recomputation. Off only to measure what it saves.
KEEP_CONSTANTS = True


def kept_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), for a parameter cast to the compute dtype inside an autograd.Function's
    forward (no graph through the cast). Within a checkpointed layer, the first forward's cast is
    kept on the layer's autograd node and its recomputation reuses it: no launch then. An 8B step
    at 2048 tokens is host-bound in its backward, where the recomputation cast every adapter
    again (~13 launches a layer); the casts cost their size in device memory from the first
    forward until the layer's backward (bf16 LoRA r 16 on all seven projections of Llama-3-8B:
    2.6 MiB a layer, ~3.3 MiB with fused_qkv's block-diagonal B; at most ~0.1 GiB at the end of
    the forward, below the backward's peak, where the H100 measured +3 MiB).
    Keyed by the tensor's identity and version, so a parameter changed in between is cast anew."""
    if t.dtype == dtype:
        return t
    return kept_constant(("cast", id(t), t._version, dtype), lambda: t.to(dtype), t)


def kept_constant(key, make, *operands: Tensor):
    """make(), a value that depends only on `operands` (parameters), computed once per
    checkpointed layer and step: in the layer's first forward, then reused by its recomputation
    (see kept_cast); elsewhere, or where an operand requires grad under grad mode (a graph must
    go through it), make() every time. `key` must identify the operands and their versions."""
    constants = getattr(_phase, "constants", None)
    if (not KEEP_CONSTANTS or phase() is None or constants is None
            or (torch.is_grad_enabled() and any(t.requires_grad for t in operands))):  # fmt: skip
        return make()
    value = constants.get(key)
    if value is None:
        value = constants[key] = make()
    return value


@contextlib.contextmanager
def _in_phase(value: tuple[str, int], stash: dict, offloading: bool = False, earlier_stash=None,
              constants: dict | None = None):  # fmt: skip
    previous = (phase(), getattr(_phase, "stash", None), getattr(_phase, "offloading", False),
                getattr(_phase, "earlier_stash", None), getattr(_phase, "constants", None))  # fmt: skip
    _phase.value, _phase.stash, _phase.offloading, _phase.earlier_stash, _phase.constants = (
        value, stash, offloading, earlier_stash, constants)  # fmt: skip
    try:
        yield
    finally:
        _phase.value, _phase.stash, _phase.offloading, _phase.earlier_stash, _phase.constants = previous


class _Parked:
    """One layer input parked in pinned host memory: `host`, and once fetched back, `fetched` (on
    the device) with the event `fetched_ready` that the compute stream waits for."""

    __slots__ = ("host", "device", "requires_grad", "stored", "fetched", "fetched_ready", "previous", "stash",
                 "__weakref__")  # fmt: skip

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, requires_grad: bool,
                 previous: "_Parked | None"):  # fmt: skip
        self.device = device
        self.requires_grad = requires_grad
        self.host = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.stored = None  # the device → host copy's completion event
        self.fetched = None
        self.fetched_ready = None
        # The layer run just before this one: its input is what backward needs next. A weak
        # reference, so that parked inputs of finished steps never chain together.
        self.previous = weakref.ref(previous) if previous is not None else None
        self.stash = None  # a layer input's: its layer's remember() values (a dict), see prefetcher


class _Member:
    """A tensor of a tuple parked together (_Offloader.park_together): bytes [offset, offset +
    nbytes) of its group's buffer, viewed as its dtype and shape."""

    __slots__ = ("parked", "offset", "dtype", "shape")

    def __init__(self, parked: _Parked, offset: int, tensor: Tensor):
        self.parked, self.offset, self.dtype, self.shape = parked, offset, tensor.dtype, tensor.shape

    def view_of(self, buffer: Tensor) -> Tensor:
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        return buffer[self.offset : self.offset + nbytes].view(self.dtype).view(self.shape)


#: Whether the offloaded CUDA tensors of a remembered tuple share one host buffer and one copy
#: back (_Offloader.park_together). Off only to measure what it saves.
PARK_TOGETHER = True

#: Byte alignment of each tensor in a group's buffer (any dtype's view of its bytes is aligned,
#: and so are the kernels' vector loads).
_GROUP_ALIGNMENT = 256


class _Offloader:
    """Moves checkpointed layer inputs to pinned host memory and back on one side stream per
    device (see the module docstring)."""

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None

    def _side(self, device: torch.device) -> "torch.cuda.Stream":
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @staticmethod
    def wants(tensor: Tensor) -> bool:
        return tensor.device.type == "cuda" and tensor.is_contiguous() and tensor.numel() > 0

    def park(self, tensor: Tensor, chain: bool = True) -> _Parked:
        """`chain`: a layer input, whose fetch brings back the previous layer's input meanwhile;
        False for what a layer remembers beside it (remember(offload=True)), fetched with the
        layer's own backward."""
        previous = self._last() if chain and self._last is not None else None
        parked = _Parked(tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad, previous)
        compute, side = torch.cuda.current_stream(tensor.device), self._side(tensor.device)
        side.wait_stream(compute)  # the tensor was written on the compute stream
        with torch.cuda.stream(side):
            parked.host.copy_(tensor, non_blocking=True)
            parked.stored = torch.cuda.Event()
            parked.stored.record(side)
        # The caller drops the tensor now; its memory must not be handed out again until the
        # side stream has read it.
        tensor.record_stream(side)
        if chain:
            self._last = weakref.ref(parked)
        return parked

    def prefetch(self, parked: _Parked) -> None:
        if parked.fetched is not None or parked.host is None:  # on its way, or fetched already
            return
        side = self._side(parked.device)
        with torch.cuda.stream(side):
            side.wait_event(parked.stored)
            parked.fetched = torch.empty(parked.host.shape, dtype=parked.host.dtype, device=parked.device)
            parked.fetched.copy_(parked.host, non_blocking=True)
            parked.fetched_ready = torch.cuda.Event()
            parked.fetched_ready.record(side)

    def fetch(self, parked: _Parked) -> Tensor:
        """The parked tensor back on its device, ready for the compute stream; starts bringing
        back the previous layer's input meanwhile."""
        self.prefetch(parked)
        compute = torch.cuda.current_stream(parked.device)
        compute.wait_event(parked.fetched_ready)
        tensor = parked.fetched
        tensor.record_stream(compute)  # allocated on the side stream, used on the compute stream
        parked.fetched = parked.host = None
        previous = parked.previous() if parked.previous is not None else None
        if previous is not None and previous.host is not None:
            self.prefetch(previous)
        return tensor.requires_grad_(parked.requires_grad)

    def park_together(self, value: tuple) -> tuple:
        """`value` with its offloadable CUDA tensors replaced by _Members of one parked uint8
        buffer per device: the device-to-host copies go into slices of one pinned buffer, and the
        way back is one copy into one device buffer (one allocation, copy and event instead of
        one per tensor, in a backward that is host-bound at 2048 tokens). A lone tensor, or one
        that requires grad, parks by itself."""
        by_device: dict[torch.device, list[int]] = {}
        out = list(value)
        for i, t in enumerate(value):
            if isinstance(t, Tensor) and self.wants(t):
                if t.requires_grad or not PARK_TOGETHER:  # (comes back requiring grad: a tensor of its own)
                    out[i] = self.park(t, chain=False)
                else:
                    by_device.setdefault(t.device, []).append(i)
        for device, positions in by_device.items():
            if len(positions) == 1:
                out[positions[0]] = self.park(value[positions[0]], chain=False)
                continue
            offsets, total = [], 0
            for i in positions:
                offsets.append(total)
                nbytes = value[i].numel() * value[i].element_size()
                total += -(-nbytes // _GROUP_ALIGNMENT) * _GROUP_ALIGNMENT
            parked = _Parked((total,), torch.uint8, device, False, None)
            compute, side = torch.cuda.current_stream(device), self._side(device)
            side.wait_stream(compute)  # the tensors were written on the compute stream
            with torch.cuda.stream(side):
                for i, offset in zip(positions, offsets):
                    out[i] = _Member(parked, offset, value[i])
                    out[i].view_of(parked.host).copy_(value[i], non_blocking=True)
                    value[i].record_stream(side)  # dropped by the caller: not reused before the copy
                parked.stored = torch.cuda.Event()
                parked.stored.record(side)
        return tuple(out)

    def fetch_together(self, value: tuple) -> tuple:
        """A remembered tuple back on its devices: each parked group fetched once, its members
        views of the group's device buffer (which lives while any of them does)."""
        buffers: dict[int, Tensor] = {}
        out = []
        for t in value:
            if isinstance(t, _Member):
                buffer = buffers.get(id(t.parked))
                if buffer is None:
                    buffer = buffers[id(t.parked)] = self.fetch(t.parked)
                out.append(t.view_of(buffer))
            else:
                out.append(self.fetch(t) if isinstance(t, _Parked) else t)
        return tuple(out)


_offloader = _Offloader()


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, offload, dummy, *args):
        ctx.fn = fn
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in args]
        kept, ctx.parked = [], {}
        for i in ctx.tensor_positions:
            if offload and _Offloader.wants(args[i]):
                ctx.parked[i] = _offloader.park(args[i])
            else:
                kept.append(args[i])
        ctx.save_for_backward(*kept)
        ctx.device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
        ctx.autocast = [(t, torch.get_autocast_dtype(t)) for t in ("cuda", "cpu") if torch.is_autocast_enabled(t)]
        ctx.token = next(_calls)
        ctx.stash = {}  # remember()/replayed(): values the recomputation reuses
        ctx.layer_constants = {}  # kept_constant(): parameter casts and the like, made once
        for parked in ctx.parked.values():
            parked.stash = ctx.stash  # what prefetcher() brings back with the layer's input
        with torch.no_grad(), _in_phase(("forward", ctx.token), ctx.stash, offloading=bool(ctx.parked),
                                        constants=ctx.layer_constants):
            return fn(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        kept = iter(ctx.saved_tensors)
        args = list(ctx.constants)
        inputs = []
        parked_inputs = list(ctx.parked.values())
        for position in ctx.tensor_positions:
            parked = ctx.parked.pop(position, None)
            tensor = next(kept) if parked is None else _offloader.fetch(parked)
            leaf = tensor.detach().requires_grad_(tensor.requires_grad)
            args[position] = leaf
            inputs.append(leaf)
        for parked in _parked_in(ctx.stash):  # remembered in host memory: on its way back (if not yet)
            _offloader.prefetch(parked)
        devices = [ctx.device] if ctx.device_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), _autocast(ctx.autocast), \
                _in_phase(("recompute", ctx.token), ctx.stash, earlier_stash=_earlier_stash(parked_inputs),
                          constants=ctx.layer_constants):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            outputs = ctx.fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, Tensor) and o.requires_grad and g is not None]  # fmt: skip
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads: list[Tensor | None] = [None] * len(ctx.constants)
        for position, leaf in zip(ctx.tensor_positions, inputs):
            grads[position] = leaf.grad
        ctx.fn = ctx.stash = ctx.layer_constants = None  # the layer's closure (and the kwargs it holds) can go now
        return (None, None, None, *grads)


def _earlier_stash(parked_inputs: list):
    """A function giving the remember() values of the layer whose input was parked just before
    this layer's (the layer backward reaches next), or None once they are gone."""
    previous = next((p.previous for p in parked_inputs if p.previous is not None), None)
    if previous is None:
        return None

    def stash():
        layer_input = previous()
        return None if layer_input is None else layer_input.stash

    return stash


def _autocast(states):
    stack = contextlib.ExitStack()
    for device_type, dtype in states:
        stack.enter_context(torch.autocast(device_type, dtype=dtype))
    return stack


def checkpoint(fn, *args, offload: bool = False, **kwargs):
    """Runs fn(*args, **kwargs) keeping only the tensors in `args` for backward (see the module
    docstring), in pinned host memory with `offload=True`. Same call shape as
    torch.utils.checkpoint.checkpoint; its keyword options (use_reentrant, ...) are accepted and
    ignored."""
    for option in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug"):
        kwargs.pop(option, None)
    if kwargs:
        fn = _bind(fn, kwargs)
    if not torch.is_grad_enabled():
        return fn(*args)
    dummy = torch.empty(0, requires_grad=True)
    return _LayerCheckpoint.apply(fn, offload, dummy, *args)


#: `checkpoint` with the saved inputs offloaded to pinned host memory.
checkpoint_offloaded = functools.partial(checkpoint, offload=True)


def _bind(fn, kwargs):
    def bound(*args):
        return fn(*args, **kwargs)

    return bound


def enable(model: torch.nn.Module, offload: bool = False) -> bool:
    """Checkpoint each decoder layer of a transformers model with `checkpoint` (offloading the
    saved layer inputs to pinned host memory with `offload=True`). Returns False (nothing changed)
    for models without transformers' per-layer checkpointing hooks."""
    setter = getattr(model, "_set_gradient_checkpointing", None)
    if not callable(setter) or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    setter(enable=True, gradient_checkpointing_func=checkpoint_offloaded if offload else checkpoint)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    return True


def is_ours(function) -> bool:
    """Whether `function` (a layer's _gradient_checkpointing_func) is this module's checkpoint."""
    return function is checkpoint or function is checkpoint_offloaded


def is_enabled(model: torch.nn.Module, offload: bool | None = None) -> bool:
    """Whether `enable` switched this model's layers to our checkpoint (with offloading, without
    it, or either: offload=None)."""
    wanted = {None: (checkpoint, checkpoint_offloaded), True: (checkpoint_offloaded,), False: (checkpoint,)}[offload]
    return any(getattr(m, "_gradient_checkpointing_func", None) in wanted and getattr(m, "gradient_checkpointing", False)
               for m in model.modules())  # fmt: skip
