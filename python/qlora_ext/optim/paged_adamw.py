"""PagedAdamW: AdamW with fused update kernels and paged 32-bit or 8-bit blockwise state.

    opt = qlora_ext.PagedAdamW(model.parameters(), lr=2e-4)                  # 32-bit state
    opt = qlora_ext.PagedAdamW(params, bits=8, device_budget=256 << 20)     # 8-bit, 256 MiB pool

Math: cpp/include/qlora/adamw.h (torch.optim.AdamW's, decoupled weight decay). State placement:
pager.py. Behaviour worth knowing:

- Parameters with requires_grad=False get no state; those whose .grad is None are skipped (their
  pages are not even copied when no parameter of the page has a grad).
- Non-finite gradients: before touching anything, one fused reduction (max |g| over all grads)
  checks every gradient; if any is inf/NaN the whole step is skipped (no parameter, state or step
  count changes), `skipped_steps` is incremented and a RuntimeWarning is issued, as AMP's
  GradScaler does. This costs one device-to-host sync per step; `check_finite=False` removes it.
- `max_grad_norm`: global L2 clipping, applied in the kernels as a gradient multiplier.
- 8-bit state: tensors with fewer than 4096 elements keep 32-bit state (as bitsandbytes).
- device_budget=None: state is resident on the parameters' device when it takes at most half the
  device's free memory, else paged with a pool of a quarter of it. A budget at least the size of
  the state means resident. CPU parameters: resident (the fused CPU kernels) unless a budget is
  given, which pages between two CPU buffers (used by the tests to exercise the pager).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable

import torch

from .. import device_memory
from ..codebooks import dynamic_map

#: Device bytes of a CUDA budget kept for the tensors a step allocates besides the pool: the max |g|
#: reduction makes one 0-d tensor per parameter (the CUDA allocator's smallest block is 512 B) and
#: a few scalars.
RESERVED_BYTES = 64 << 10
RESERVED_BYTES_PER_TENSOR = 512
from . import ops
from ..oom import explain_oom
from .pager import Pager, Segment, plan_pages, segment_bytes

MIN_8BIT_SIZE = 4096
#: Page size without a budget (state paged into a quarter of the free memory) and the largest
#: automatic one: at 55 GB/s a 16 MiB page takes ~0.3 ms to copy, far more than the ~0.05 ms of
#: host work per page, and few pages keep that work small.
DEFAULT_PAGE_BYTES = 16 << 20
MIN_AUTO_PAGE_BYTES = 64 << 10


def auto_page_bytes(device_budget: int | None) -> int:
    """Page size for page_bytes=None: a quarter of the budget (so the pool has ~4 slots: one
    being updated, one loading, one storing, one spare), within [64 KiB, 16 MiB], a multiple of
    256."""
    if device_budget is None:
        return DEFAULT_PAGE_BYTES
    page = min(DEFAULT_PAGE_BYTES, device_budget // 4) // 256 * 256
    return max(MIN_AUTO_PAGE_BYTES, page)
_FORMAT = 1


class PagedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        bits: int = 32,
        device_budget: int | None = None,
        page_bytes: int | None = None,
        max_grad_norm: float | None = None,
        check_finite: bool = True,
    ):
        if bits not in (32, 8):
            raise ValueError(f"bits must be 32 or 8, got {bits!r}")
        if page_bytes is None:
            page_bytes = auto_page_bytes(device_budget if isinstance(device_budget, int) else None)
        if not isinstance(page_bytes, int) or page_bytes < 4096 or page_bytes % 256:
            raise ValueError(f"page_bytes must be an int >= 4096 and a multiple of 256, got {page_bytes!r}")
        if device_budget is not None and (not isinstance(device_budget, int) or device_budget < 0):
            raise ValueError(f"device_budget must be None or a number of bytes >= 0, got {device_budget!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.bits = bits
        self.device_budget = device_budget
        self.page_bytes = page_bytes
        self.max_grad_norm = max_grad_norm
        self.check_finite = check_finite
        self.skipped_steps = 0
        self._pager: Pager | None = None
        super().__init__(params, defaults)

    # ---- parameter groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_pager", None) is not None:
            raise RuntimeError("PagedAdamW: add_param_group after the first step is not supported "
                               "(the state pages are laid out then); create a new optimizer")  # fmt: skip
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        _check_hyper(group, gi)
        for pi, p in enumerate(group["params"]):
            if p.is_complex():
                raise TypeError(f"param_groups[{gi}]['params'][{pi}] is complex ({p.dtype}); "
                                "PagedAdamW supports float32, float16 and bfloat16 parameters")  # fmt: skip
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"param_groups[{gi}]['params'][{pi}] has dtype {p.dtype}; "
                                "PagedAdamW supports float32, float16 and bfloat16 parameters")  # fmt: skip

    # ---- layout ------------------------------------------------------------------------------

    def _state_bits(self, p: torch.Tensor) -> int:
        return 8 if self.bits == 8 and p.numel() >= MIN_8BIT_SIZE else 32

    def _build(self) -> None:
        """Lays the state of every trainable parameter out in pages and places them."""
        managed = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.requires_grad]
        devices = {p.device for _, p in managed}
        if len(devices) > 1:
            raise ValueError(f"PagedAdamW needs all trainable parameters on one device, got {sorted(map(str, devices))}")
        self._device = devices.pop() if devices else torch.device("cpu")
        for gi, p in managed:
            if not p.is_contiguous():
                raise ValueError(f"a parameter of param_groups[{gi}] (shape {tuple(p.shape)}) is not "
                                 "contiguous; PagedAdamW updates parameters in place as flat arrays")  # fmt: skip
        self._params = [p for _, p in managed]
        self._group_of = [gi for gi, _ in managed]
        self._index_of = {id(p): i for i, p in enumerate(self._params)}
        self._steps = [0] * len(self._params)
        sizes = [(p.numel(), self._state_bits(p)) for p in self._params]
        pages = plan_pages(sizes, self.page_bytes)
        self._segments_of: list[list[tuple[int, Segment]]] = [[] for _ in self._params]
        for k, page in enumerate(pages):
            for seg in page:
                self._segments_of[seg.param].append((k, seg))
        self._maps = None
        map_bytes = 0
        if any(bits == 8 for _, bits in sizes):
            self._maps = (dynamic_map(True, self._device), dynamic_map(False, self._device))
            map_bytes = 2 * 256 * 4
        zero_codes = (_zero_code(dynamic_map(True)), _zero_code(dynamic_map(False)))
        state_bytes = len(pages) * self.page_bytes
        n_slots = self._n_slots(state_bytes, map_bytes, len(pages))
        page_bytes = self.page_bytes
        if n_slots is None and sizes:
            # Resident: one page sized to the state, so every parameter is one whole segment and
            # the update is a few operator calls over lists built once (_Plan).
            page_bytes = sum(segment_bytes(bits, n) for n, bits in sizes)
            pages = plan_pages(sizes, page_bytes)
            self._segments_of = [[] for _ in self._params]
            for k, page in enumerate(pages):
                for seg in page:
                    self._segments_of[seg.param].append((k, seg))
        where = ("resident optimizer state" if n_slots is None
                 else f"the optimizer's device pool ({n_slots} pages of {page_bytes} bytes)")  # fmt: skip
        with explain_oom(f"allocating {where}, {len(pages) * page_bytes} bytes of state in all",
                         "Pass PagedAdamW(device_budget=<bytes>) to keep the state in pinned host "
                         "memory with a device pool of that size (or a smaller budget), or bits=8"):  # fmt: skip
            self._pager = Pager(pages, page_bytes, self._device, n_slots,
                                lambda seg, views: _init_segment(seg, views, zero_codes))  # fmt: skip
        self._map_bytes = map_bytes
        self._param_views: dict[tuple[int, int], torch.Tensor] = {}
        self._state_views: dict[tuple[int, int], list[dict[str, torch.Tensor]]] = {}
        # Argument lists of the update, by the tuple of parameters that have a grad (_Plan).
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._last_active: tuple[int, ...] | None = None

    def _n_slots(self, state_bytes: int, map_bytes: int, n_pages: int) -> int | None:
        """None for resident state, else the number of device pages of the pool.

        On CUDA the budget covers the pool, the 8-bit code maps, and a reserve for the small
        tensors a step allocates (RESERVED_BYTES*), so that the device memory this optimizer uses,
        measured, never exceeds device_budget.
        """
        budget = self.device_budget
        if budget is not None:
            if self._device.type == "cuda":
                map_bytes += RESERVED_BYTES + RESERVED_BYTES_PER_TENSOR * stepped_tensor_count(self)
            if budget - map_bytes < self.page_bytes:
                raise ValueError(f"device_budget ({budget} bytes) is smaller than one page "
                                 f"(page_bytes = {self.page_bytes}) plus {map_bytes} bytes of "
                                 "code maps and per-step scratch; raise the budget or lower page_bytes")  # fmt: skip
            if budget - map_bytes >= state_bytes:
                return None
            return (budget - map_bytes) // self.page_bytes
        if self._device.type != "cuda":
            return None
        free = device_memory.available_bytes(self._device)
        if state_bytes <= free // 2:
            return None
        return max(2, (free // 4) // self.page_bytes)

    # ---- reporting ---------------------------------------------------------------------------

    def device_bytes(self) -> int:
        """Bytes this optimizer holds on the parameters' device (state pages or pool + maps)."""
        if self._pager is None:
            return 0
        return self._pager.device_bytes() + self._map_bytes

    def state_bytes(self) -> int:
        """Bytes of all optimizer state (every page), wherever it lives."""
        return 0 if self._pager is None else len(self._pager.pages) * self._pager.page_bytes

    @property
    def paged(self) -> bool:
        return self._pager is not None and self._pager.paged

    @property
    def pager_stats(self) -> dict:
        return {} if self._pager is None else dict(self._pager.stats)

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pager is None:
            self._build()
        # One pass over the parameters: this loop runs every step for hundreds of tensors, so it
        # does nothing but collect the grads (a list aligned with self._params, None = no grad).
        grads: list[torch.Tensor | None] = [None] * len(self._params)
        active = []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise RuntimeError(f"PagedAdamW does not support sparse gradients (parameter {i} of "
                                   f"shape {tuple(p.shape)} in param_groups[{self._group_of[i]}])")  # fmt: skip
            grads[i] = g if g.is_contiguous() else g.contiguous()
            active.append(i)
        if not active:
            return loss
        grad_scale = self._grad_scale(grads if len(active) == len(grads) else [grads[i] for i in active])
        if grad_scale is None:
            self.skipped_steps += 1
            warnings.warn(f"PagedAdamW: non-finite gradient, step skipped "
                          f"({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=2)  # fmt: skip
            return loss
        steps = self._steps
        for i in active:
            steps[i] += 1
        plan = self._plan(tuple(active))
        base = steps[active[0]]
        self._pager.update(plan.pages, lambda pages: self._run(plan, pages, grads, base, grad_scale))
        # The native kernels write through data pointers, which autograd does not see: bump the
        # parameters' version counters as torch's optimizers' in-place updates do (a graph that
        # saved a parameter then refuses a backward after the step; caches keyed on versions see
        # the change).
        torch.autograd.graph.increment_version([self._params[i] for i in active])
        return loss

    def _grad_scale(self, grad_list: list[torch.Tensor]) -> float | None:
        """The clipping multiplier (1.0 without max_grad_norm), or None when a gradient is not
        finite. One device-to-host sync: with clipping, a finite global L2 norm already proves
        every gradient finite (a non-finite one makes it inf/NaN), so max |g| is only computed
        when the norm is not finite, to tell a non-finite gradient from a norm that overflowed."""
        if self.max_grad_norm is None:
            if self.check_finite and not math.isfinite(_max_abs(grad_list).item()):
                return None
            return 1.0
        # stack promotes mixed dtypes; .float() so the sum of squares is taken in fp32
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad_list)).float()).item()
        if not math.isfinite(total) and self.check_finite and not math.isfinite(_max_abs(grad_list).item()):
            return None
        return min(1.0, self.max_grad_norm / (total + 1e-6))

    def _plan(self, active: tuple[int, ...]) -> _Plan:
        """The update's argument lists for this set of parameters with grads, built once and
        reused while the set and the parameters' relative step counts stay the same. Parameters
        that step together keep their relative counts, so a step with the same set as the last
        one needs no check; another set (grads that come and go) is checked against its cached
        plan's relative counts and rebuilt when they moved."""
        plan = self._plans.get(active)
        if plan is not None and active == self._last_active:
            return plan
        base = self._steps[active[0]]
        offsets = tuple(self._steps[i] - base for i in active)
        if plan is None or plan.offsets != offsets:
            if len(self._plans) >= _MAX_PLANS:  # bound the views held for unusual grad patterns
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[active] = _Plan(active, offsets, self._pager.pages, self._segments_of)
        self._last_active = active
        return plan

    def _run(self, plan: _Plan, pages, grads: list, base: int, grad_scale: float) -> None:
        """Launches the update of `pages` [(k, page bytes on the device)]: one operator call per
        (group, relative step, state width) of each page, over lists built once per page and
        buffer; per step only the grads are gathered (sliced where a parameter spans pages)."""
        for k, buf in pages:
            key = (k, buf.data_ptr())
            calls = plan.calls.get(key)
            if calls is None:
                calls = plan.calls[key] = self._page_calls(plan, k, buf)
            for gi, bits, offset, gather, params, state in calls:
                self._launch(gi, bits, base + offset, grad_scale, params, gather(grads), state)

    def _launch(self, gi: int, bits: int, step: int, grad_scale: float, params, grads_, state) -> None:
        group = self.param_groups[gi]
        beta1, beta2 = group["betas"]
        # Read per call: a scheduler may change lr (or anything else) between steps.
        h = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
             float(group["weight_decay"]), step, grad_scale)  # fmt: skip
        # The native operators directly: the lists are dense by construction (step() rejected
        # sparse grads), so the Python wrappers' per-tensor layout checks would only cost time.
        native = ops._ops()
        if bits == 32:
            native.adamw_step(params, grads_, state["exp_avg"], state["exp_avg_sq"], *h)
        else:
            native.adamw_step_8bit(params, grads_, state["exp_avg_codes"], state["exp_avg_absmax"],
                                   state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"],
                                   self._maps[0], self._maps[1], *h)  # fmt: skip

    def _page_calls(self, plan: _Plan, k: int, buf: torch.Tensor) -> list[tuple]:
        """(group, bits, relative step, grad gatherer, params, state lists) for page k's segments
        of the plan's parameters, with their state in `buf`."""
        groups: dict[tuple[int, int, int], dict] = {}
        for seg, views in zip(self._pager.pages[k], self._page_views(k, buf)):
            offset = plan.offset_of.get(seg.param)
            if offset is None:  # no grad this step
                continue
            entry = groups.setdefault((self._group_of[seg.param], seg.bits, offset),
                                      {"grads": [], "params": [], "views": []})  # fmt: skip
            whole = seg.begin == 0 and seg.end == self._params[seg.param].numel()
            entry["grads"].append((seg.param, None if whole else (seg.begin, seg.end)))
            entry["params"].append(self._param_view(seg))
            entry["views"].append(views)
        calls = []
        for (gi, bits, offset), entry in groups.items():
            views = entry["views"]
            state = {name: [v[name] for v in views] for name in views[0]}
            calls.append((gi, bits, offset, _gatherer(entry["grads"]), entry["params"], state))
        return calls

    def _param_view(self, seg: Segment) -> torch.Tensor:
        """The parameter's elements of `seg` (the parameter itself for a whole one), cached."""
        key = (seg.param, seg.begin)
        view = self._param_views.get(key)
        if view is None:
            p = self._params[seg.param]
            view = p if seg.begin == 0 and seg.end == p.numel() else p.view(-1)[seg.begin : seg.end]
            self._param_views[key] = view
        return view

    def _page_views(self, k: int, buf: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """State views of page k's segments in `buf` (its home or a pool slot), cached per slot."""
        key = (k, buf.data_ptr())
        views = self._state_views.get(key)
        if views is None:
            views = [seg.views(buf) for seg in self._pager.pages[k]]
            self._state_views[key] = views
        return views

    # ---- state dict --------------------------------------------------------------------------

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """torch's layout (`state` by parameter index, `param_groups`), with the state as
        ordinary tensors: exp_avg/exp_avg_sq fp32 shaped like the parameter (32-bit), or
        exp_avg_codes/exp_avg_sq_codes uint8 [n] and *_absmax fp32 [ceil(n/256)] (8-bit)."""
        sd = super().state_dict()  # param_groups, with torch's numbering and hooks
        state = {}
        if self._pager is not None:
            for index, p in enumerate(self._flat_params()):
                i = self._index_of.get(id(p))
                if i is None or self._steps[i] == 0:
                    continue
                entry = {"step": torch.tensor(float(self._steps[i]))}
                entry.update(self._export(i))
                state[index] = entry
        sd["state"] = state
        sd["qlora_ext"] = {"format": _FORMAT, "bits": self.bits, "blocksize": 256,
                           "min_8bit_size": MIN_8BIT_SIZE}  # fmt: skip
        return sd

    def _export(self, i: int) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for k, seg in self._segments_of[i]:
            for name, view in seg.views(self._pager.host_view(k)).items():
                parts.setdefault(name, []).append(view)
        out = {name: torch.cat(views) for name, views in parts.items()}
        p = self._params[i]
        if "exp_avg" in out:
            out["exp_avg"] = out["exp_avg"].view(p.shape)
            out["exp_avg_sq"] = out["exp_avg_sq"].view(p.shape)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of this class (or torch.optim.AdamW's, for bits=32) after checking
        that it fits these parameters; then steps resume bit-exactly."""
        meta = state_dict.get("qlora_ext")
        bits = meta["bits"] if meta is not None else 32
        if bits != self.bits:
            raise ValueError(f"state_dict holds bits={bits} optimizer state but this PagedAdamW has "
                             f"bits={self.bits}")  # fmt: skip
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups but this optimizer "
                             f"has {len(self.param_groups)}")  # fmt: skip
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param_groups[{gi}] has {len(saved['params'])} "
                                 f"parameters but this optimizer's has {len(group['params'])}")  # fmt: skip
        if self._pager is None:
            self._build()
        flat = self._flat_params()
        # map saved ids (torch numbers them in group order) to our parameters
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        id_to_param = dict(zip(saved_ids, flat))
        loads = []
        for pid, entry in state_dict["state"].items():
            if pid not in id_to_param:
                raise ValueError(f"state_dict state has parameter id {pid!r}, not in its param_groups")
            p = id_to_param[pid]
            i = self._index_of.get(id(p))
            if i is None:
                raise ValueError(f"state_dict has state for parameter {pid} but that parameter does "
                                 "not require grad here")  # fmt: skip
            loads.append((i, self._check_entry(pid, p, entry)))
        # only now that everything checked out, change anything
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        self._steps = [0] * len(self._params)
        self._plans.clear()  # their relative step counts no longer hold
        self._last_active = None
        for k, page in enumerate(self._pager.pages):
            zero_codes = (_zero_code(dynamic_map(True)), _zero_code(dynamic_map(False)))
            for seg in page:
                _init_segment(seg, seg.views(self._pager.host_view(k)), zero_codes)
        for i, (step, tensors) in loads:
            self._steps[i] = step
            for k, seg in self._segments_of[i]:
                views = seg.views(self._pager.host_view(k))
                for name, view in views.items():
                    src = tensors[name].reshape(-1)
                    if name.endswith("absmax"):
                        src = src[seg.begin // 256 : seg.begin // 256 + view.numel()]
                    else:
                        src = src[seg.begin : seg.end]
                    view.copy_(src)

    def _check_entry(self, pid, p: torch.Tensor, entry: dict) -> tuple[int, dict]:
        bits = self._state_bits(p)
        n = p.numel()
        if bits == 32:
            expected = {"exp_avg": n, "exp_avg_sq": n}
        else:
            nb = -(-n // 256)
            expected = {"exp_avg_codes": n, "exp_avg_sq_codes": n, "exp_avg_absmax": nb,
                        "exp_avg_sq_absmax": nb}  # fmt: skip
        for name, numel in expected.items():
            if name not in entry:
                raise ValueError(f"state_dict state[{pid}] lacks {name!r} ({bits}-bit state for a "
                                 f"parameter of shape {tuple(p.shape)}); it has {sorted(entry)}")  # fmt: skip
            t = entry[name]
            if not isinstance(t, torch.Tensor) or t.numel() != numel:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state_dict state[{pid}][{name!r}] has shape {shape} but the "
                                 f"parameter has shape {tuple(p.shape)} ({numel} expected)")  # fmt: skip
            dtype = torch.uint8 if name.endswith("codes") else torch.float32
            if t.dtype != dtype:
                raise ValueError(f"state_dict state[{pid}][{name!r}] is {t.dtype}, expected {dtype}")
        step = entry.get("step", 0)
        step = int(step.item() if isinstance(step, torch.Tensor) else step)
        return step, {name: entry[name].to(self._pager.home.device) for name in expected}


def stepped_tensor_count(opt) -> int:
    """Parameters this optimizer steps (each costs one small tensor in the max |g| reduction)."""
    return sum(1 for group in opt.param_groups for p in group["params"] if p.requires_grad)


def _max_abs(grads: list[torch.Tensor]) -> torch.Tensor:
    """max |g| over all grads, NaN-propagating: unlike a sum of squares it cannot overflow, so a
    non-finite result means a non-finite gradient. One fused multi-tensor reduction on CUDA. On
    the CPU torch's inf-norm takes a slow path (~20x slower than amin/amax on large tensors) and
    per-tensor reductions cost one dispatch each, so small grads are flattened into one tensor
    (a copy of few bytes) and reduced once; large ones are reduced alone, where the dispatch is
    negligible next to the data."""
    if grads[0].device.type == "cuda":
        return torch.stack(torch._foreach_norm(grads, math.inf)).max()  # stack promotes mixed dtypes
    small = [g.view(-1) for g in grads if 0 < g.numel() <= _CPU_CAT_NUMEL]
    large = [g for g in grads if g.numel() > _CPU_CAT_NUMEL]
    peaks = [torch.stack(torch.aminmax(t.float() if t.dtype != torch.float32 else t)).abs().max()
             for t in ([torch.cat(small)] if small else []) + large]  # fmt: skip
    return torch.stack(peaks).max() if peaks else torch.tensor(0.0)


#: CPU grads up to this many elements are concatenated for the finiteness check (_max_abs).
_CPU_CAT_NUMEL = 1 << 16
#: Plans kept at once (_plan): one per distinct set of parameters with grads seen recently.
_MAX_PLANS = 4


class _Plan:
    """Argument lists of the update for one set of parameters with grads (`active`, ascending)
    whose step counts are `offsets` above the first one's: the pages to visit and, filled per
    (page, device buffer) as they are first visited, the operator calls (PagedAdamW._page_calls).
    """

    __slots__ = ("active", "offsets", "offset_of", "pages", "calls")

    def __init__(self, active: tuple[int, ...], offsets: tuple[int, ...], pages, segments_of):
        self.active = active
        self.offsets = offsets
        self.offset_of = dict(zip(active, offsets))
        self.pages = sorted({k for i in active for k, _ in segments_of[i]})
        self.calls: dict[tuple[int, int], list[tuple]] = {}


def _gatherer(specs: list[tuple[int, tuple[int, int] | None]]):
    """grads (aligned with the parameters) -> this call's grad list. Whole parameters are picked
    by one C-level itemgetter; a parameter split across pages needs its element range sliced."""
    if all(rng is None for _, rng in specs):
        if len(specs) == 1:
            only = specs[0][0]
            return lambda grads: [grads[only]]
        return operator.itemgetter(*(i for i, _ in specs))
    return lambda grads: [grads[i] if rng is None else grads[i].view(-1)[rng[0] : rng[1]] for i, rng in specs]


def _check_hyper(group: dict, gi: int) -> None:
    lr, eps, wd, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"param_groups[{gi}]['lr'] must be a float, not a tensor")
    if not (lr >= 0):
        raise ValueError(f"param_groups[{gi}]['lr'] must be >= 0, got {lr}")
    if not (eps > 0):
        raise ValueError(f"param_groups[{gi}]['eps'] must be > 0, got {eps}")
    if not (wd >= 0):
        raise ValueError(f"param_groups[{gi}]['weight_decay'] must be >= 0, got {wd}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"param_groups[{gi}]['betas'] must be two numbers in [0, 1), got {betas}")


def _zero_code(code_map: torch.Tensor) -> int:
    """Index of the map entry nearest to 0 (what the kernels' quantizer gives 0.0)."""
    midpoints = (code_map[:-1] + code_map[1:]) / 2
    return int(torch.bucketize(torch.tensor(0.0), midpoints, right=False))


def _init_segment(seg: Segment, views: dict[str, torch.Tensor], zero_codes: tuple[int, int]) -> None:
    for name, view in views.items():
        if name == "exp_avg_codes":
            view.fill_(zero_codes[0])
        elif name == "exp_avg_sq_codes":
            view.fill_(zero_codes[1])
        else:
            view.zero_()


__all__ = ["PagedAdamW", "segment_bytes"]
