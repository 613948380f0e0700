"""Paged optimizer state (DESIGN.md §5): where each piece of state lives and how pages move.

The state of every trainable parameter is cut into *segments* (element ranges of one parameter)
packed into fixed-size *pages* of `page_bytes` bytes. A page's bytes hold, per segment:

  32-bit: exp_avg fp32 [len] | exp_avg_sq fp32 [len]
  8-bit:  exp_avg codes uint8 [len] | exp_avg_sq codes uint8 [len] |
          exp_avg absmax fp32 [ceil(len/256)] | exp_avg_sq absmax fp32 [ceil(len/256)]

each array starting at a 16-byte boundary. Segments split parameters at multiples of 256 elements,
so 8-bit blocks never straddle pages and every segment start stays 16-byte aligned for the
vectorised kernels; the update is elementwise (per 256-block for 8-bit state), so a segmented
update gives exactly the bits of a whole-tensor one.

Two placements:
  resident  every page lives on the parameters' device (`home`); no copies.
  paged     pages live in host memory (pinned when the device is a GPU); a pool of `n_slots`
            device pages holds what the current update needs. Page k+1.. are copied in on a side
            stream while page k is updated on the current stream; each page is copied back after
            its update on a second side stream (events order the three). Nothing else is held on
            the device, so the device footprint is n_slots * page_bytes (+ the two 1 KiB maps).

The pipeline logic is the same for any device: on a CPU "device" (used by the tests) the copies
are plain synchronous copies, and `stats` counts them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

BLOCK = 256  # split granularity and 8-bit block size
ALIGN = 16


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_bytes(bits: int, length: int) -> int:
    """Page bytes taken by a segment of `length` elements of `bits`-bit state."""
    if bits == 32:
        return 2 * _align(4 * length)
    blocks = -(-length // BLOCK)
    return 2 * _align(length) + 2 * _align(4 * blocks)


@dataclasses.dataclass(frozen=True)
class Segment:
    param: int  # index into the pager's parameter list
    begin: int  # element range [begin, end) of that parameter
    end: int
    bits: int  # 32 or 8
    offset: int  # byte offset in its page

    @property
    def length(self) -> int:
        return self.end - self.begin

    def views(self, page: torch.Tensor) -> dict[str, torch.Tensor]:
        """The segment's state arrays as views into `page` (uint8 [page_bytes])."""
        n, o = self.length, self.offset
        if self.bits == 32:
            a = _align(4 * n)
            return {
                "exp_avg": page[o : o + 4 * n].view(torch.float32),
                "exp_avg_sq": page[o + a : o + a + 4 * n].view(torch.float32),
            }
        blocks = -(-n // BLOCK)
        c, s = _align(n), _align(4 * blocks)
        return {
            "exp_avg_codes": page[o : o + n],
            "exp_avg_sq_codes": page[o + c : o + c + n],
            "exp_avg_absmax": page[o + 2 * c : o + 2 * c + 4 * blocks].view(torch.float32),
            "exp_avg_sq_absmax": page[o + 2 * c + s : o + 2 * c + s + 4 * blocks].view(torch.float32),
        }


def _fit(bits: int, avail: int) -> int:
    """The most elements, a multiple of 256, whose segment fits in `avail` bytes."""
    blocks = avail // (8 * BLOCK) if bits == 32 else avail // (2 * BLOCK + 8)
    while blocks > 0 and segment_bytes(bits, blocks * BLOCK) > avail:
        blocks -= 1
    return blocks * BLOCK


def plan_pages(sizes: Sequence[tuple[int, int]], page_bytes: int) -> list[list[Segment]]:
    """Pack parameters of (numel, bits) into pages, in order: first fit into the current page,
    splitting a parameter at multiples of 256 elements where it does not fit whole."""
    pages: list[list[Segment]] = [[]]
    used = 0
    for index, (numel, bits) in enumerate(sizes):
        begin = 0
        while begin < numel:
            remaining = numel - begin
            if segment_bytes(bits, remaining) <= page_bytes - used:
                length = remaining
            else:
                length = _fit(bits, page_bytes - used)
                if length == 0:
                    pages.append([])
                    used = 0
                    continue
            pages[-1].append(Segment(index, begin, begin + length, bits, used))
            used += segment_bytes(bits, length)
            begin += length
    return [p for p in pages if p]


class _SyncCopies:
    """Copies for a pool on the CPU (tests): immediate, counted."""

    def __init__(self, stats: dict):
        self.stats = stats

    def load(self, slot: torch.Tensor, page: torch.Tensor, j: int) -> None:
        slot.copy_(page)
        self.stats["h2d_pages"] += 1

    def ready(self, j: int) -> None:
        pass

    def store(self, page: torch.Tensor, slot: torch.Tensor, j: int) -> None:
        page.copy_(slot)
        self.stats["d2h_pages"] += 1

    def slot_free(self, j: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaCopies:
    """Copies on two side streams (one per direction), ordered against the compute stream by
    events: update j waits for load j; store j waits for update j; the load that reuses update
    j's slot waits for store j.

    Events are reused per slot (j % n_slots) instead of created per page: every wait on an event
    is enqueued before the event is recorded again (the slot's next load is issued only after its
    store), and a wait sees the record made before it, so reuse orders exactly the same work."""

    def __init__(self, device: torch.device, stats: dict, n_slots: int):
        self.stats = stats
        self.device = device
        self.n_slots = max(n_slots, 1)
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.loaded = [torch.cuda.Event() for _ in range(self.n_slots)]
        self.updated = [torch.cuda.Event() for _ in range(self.n_slots)]
        self.stored = [torch.cuda.Event() for _ in range(self.n_slots)]
        self.last_store: torch.cuda.Event | None = None
        self.compute: torch.cuda.Stream | None = None

    def start(self) -> None:
        # The stream the update runs on, looked up once a step rather than twice a page.
        self.compute = torch.cuda.current_stream(self.device)
        # This step's loads may overwrite slots and read pages that last step's stores still use,
        # and the compute stream's writes to the grads/params are ordered by program order.
        if self.last_store is not None:
            self.h2d.wait_event(self.last_store)

    def load(self, slot: torch.Tensor, page: torch.Tensor, j: int) -> None:
        with torch.cuda.stream(self.h2d):
            slot.copy_(page, non_blocking=True)
        self.loaded[j % self.n_slots].record(self.h2d)
        self.stats["h2d_pages"] += 1

    def ready(self, j: int) -> None:
        self.compute.wait_event(self.loaded[j % self.n_slots])

    def store(self, page: torch.Tensor, slot: torch.Tensor, j: int) -> None:
        updated = self.updated[j % self.n_slots]
        updated.record(self.compute)
        self.d2h.wait_event(updated)
        with torch.cuda.stream(self.d2h):
            page.copy_(slot, non_blocking=True)
        event = self.stored[j % self.n_slots]
        event.record(self.d2h)
        self.last_store = event
        self.stats["d2h_pages"] += 1

    def slot_free(self, j: int) -> None:
        self.h2d.wait_event(self.stored[j % self.n_slots])

    def finish(self) -> None:
        # Work after the step (the next forward, a state_dict) sees the written-back pages.
        if self.last_store is not None:
            self.compute.wait_event(self.last_store)

    def synchronize(self) -> None:
        self.d2h.synchronize()
        self.h2d.synchronize()


class Pager:
    """Owns the pages of one optimizer: their home (device or host) and, when paged, the device
    pool, and runs an update over a set of pages."""

    def __init__(self, pages: list[list[Segment]], page_bytes: int, device: torch.device,
                 n_slots: int | None, init: Callable[[Segment, dict[str, torch.Tensor]], None]):  # fmt: skip
        self.pages = pages
        self.page_bytes = page_bytes
        self.device = device
        self.paged = n_slots is not None
        self.stats = {"h2d_pages": 0, "d2h_pages": 0, "updates": 0}
        n_pages = len(pages)
        if self.paged:
            pin = device.type == "cuda"
            self.home = torch.zeros((n_pages, page_bytes), dtype=torch.uint8, pin_memory=pin)
            self.n_slots = min(n_slots, n_pages) if n_pages else 0
            self.pool = torch.empty((max(self.n_slots, 1), page_bytes) if n_pages else (0, page_bytes),
                                    dtype=torch.uint8, device=device)  # fmt: skip
            self.copies = (_CudaCopies(device, self.stats, self.n_slots) if device.type == "cuda"
                           else _SyncCopies(self.stats))  # fmt: skip
        else:
            self.home = torch.zeros((n_pages, page_bytes), dtype=torch.uint8, device=device)
            self.n_slots = 0
            self.pool = None
            self.copies = None
        # Per-page and per-slot views made once: indexing home/pool makes a new tensor each time,
        # a few microseconds apiece on the per-page path of every step.
        self._homes = list(self.home.unbind(0))
        self._slots = list(self.pool.unbind(0)) if self.paged else []
        for k, page in enumerate(pages):
            for seg in page:
                init(seg, seg.views(self._homes[k]))

    def device_bytes(self) -> int:
        """Bytes of optimizer state held on the device: the pool, or every page if resident."""
        if self.paged:
            return self.pool.numel()
        return self.home.numel()

    def update(self, page_ids: Sequence[int],
               fn: Callable[[list[tuple[int, torch.Tensor]]], None]) -> None:  # fmt: skip
        """Runs fn([(page index, page bytes on the device), ...]) over `page_ids` (ascending):
        once with all of them when resident, else once per page as it arrives in the pool."""
        if not page_ids:
            return
        if not self.paged:
            homes = self._homes
            fn([(k, homes[k]) for k in page_ids])
            self.stats["updates"] += 1
            return
        copies, slots, homes, pool = self.copies, self.n_slots, self._homes, self._slots
        if isinstance(copies, _CudaCopies):
            copies.start()
        for j in range(min(slots, len(page_ids))):
            copies.load(pool[j], homes[page_ids[j]], j)
        for j, k in enumerate(page_ids):
            slot = pool[j % slots]
            copies.ready(j)
            fn([(k, slot)])
            copies.store(homes[k], slot, j)
            if j + slots < len(page_ids):
                copies.slot_free(j)
                copies.load(slot, homes[page_ids[j + slots]], j + slots)
        self.stats["updates"] += len(page_ids)
        copies.finish()

    def host_view(self, k: int) -> torch.Tensor:
        """Page k in its home, after any pending write-back (for export and import)."""
        if self.paged:
            self.copies.synchronize()
        return self._homes[k]
