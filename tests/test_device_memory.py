"""device_memory.available_bytes: what the self-sizing paths (the MLP's and the fused loss's
chunks, PagedAdamW's pages) may take, including the allocator's cached blocks and a per-process
cap (torch.cuda.set_per_process_memory_fraction) that the driver's free memory does not show.
The CUDA queries are stubbed: the arithmetic, and that each path asks it, run on any machine."""

import types

import pytest
import torch

from qlora_ext import device_memory, fused_loss, fused_mlp

GIB = 1 << 30


@pytest.fixture
def card(monkeypatch):
    """An 80 GiB card whose driver reports `free`, with this process's allocator holding
    `reserved` bytes of which `allocated` are in use, under a memory fraction `fraction`."""
    state = types.SimpleNamespace(free=50 * GIB, total=80 * GIB, reserved=20 * GIB, allocated=12 * GIB, fraction=1.0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state.free, state.total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state.reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state.allocated)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: state.fraction, raising=False)
    return state


def test_available_counts_the_allocators_cached_blocks(card):
    # 50 GiB free at the driver + 8 GiB reserved but unused
    assert device_memory.available_bytes("cuda") == 58 * GIB


def test_a_cpu_device_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="device must be a CUDA device, got 'cpu'"):
        device_memory.available_bytes("cpu")


def test_a_per_process_cap_bounds_what_is_available(card):
    card.fraction = 24 / 80  # a 24 GiB cap: 12 GiB allocated leaves 12 GiB, whatever the driver says
    assert device_memory.available_bytes("cuda") == 12 * GIB
    card.allocated = card.reserved = 30 * GIB  # past the cap (set after allocating): nothing, not a negative
    assert device_memory.available_bytes("cuda") == 0


def test_the_driver_bounds_what_is_available_under_a_loose_cap(card):
    card.fraction, card.free = 0.9, 1 * GIB  # another process holds the card
    assert device_memory.available_bytes("cuda") == 9 * GIB


class _CudaActivation:
    """What chunk_rows reads of its input: the device and the element size (bf16)."""

    device = torch.device("cuda")

    @staticmethod
    def element_size():
        return 2


def test_the_mlp_chunks_under_a_per_process_cap(card, monkeypatch):
    monkeypatch.setattr(fused_mlp, "CHUNK_ROWS", None)
    rows, intermediate = 98304, 14336  # an 8B at 98k tokens: g, u, h, dh take 10.5 GiB
    assert fused_mlp.chunk_rows(rows, intermediate, _CudaActivation()) is None  # 58 GiB available
    card.fraction = 24 / 80
    chunk = fused_mlp.chunk_rows(rows, intermediate, _CudaActivation())
    budget = 12 * GIB * fused_mlp.ACTIVATION_SHARE
    assert chunk is not None and 1024 <= chunk < rows
    assert 4 * chunk * intermediate * 2 <= budget < 4 * (chunk + 1) * intermediate * 2


def test_the_fused_loss_chunks_by_what_is_available(card, monkeypatch):
    vocab = 128256
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 1 << 40)  # only the memory bound
    roomy = fused_loss.chunk_tokens(1 << 20, vocab, torch.device("cuda"))
    card.fraction = 24 / 80
    capped = fused_loss.chunk_tokens(1 << 20, vocab, torch.device("cuda"))
    assert capped == 12 * GIB // 8 // (vocab * 8)
    assert roomy == 58 * GIB // 8 // (vocab * 8) > capped


def test_paged_adamw_pages_its_state_by_what_is_available(card):
    """Without a device_budget PagedAdamW keeps its state resident when it takes at most half of
    what is available, else pages it through a pool of a quarter of that."""
    from qlora_ext.optim.paged_adamw import PagedAdamW

    owner = types.SimpleNamespace(device_budget=None, _device=torch.device("cuda"), page_bytes=1 << 20)
    state_bytes = 10 * GIB
    assert PagedAdamW._n_slots(owner, state_bytes, 0, 1 << 14) is None  # 58 GiB available
    card.fraction = 24 / 80  # 12 GiB available: 10 GiB of state is more than half
    assert PagedAdamW._n_slots(owner, state_bytes, 0, 1 << 14) == (12 * GIB // 4) // (1 << 20)
