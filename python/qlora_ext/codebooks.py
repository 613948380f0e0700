"""The quantization code maps, as bitsandbytes defines them (DESIGN.md §3)."""

from __future__ import annotations

import functools

import torch

# index = 4-bit code; bitsandbytes' literals (recomputing them from normal quantiles differs in the
# last digits, and the literals are what every NF4 checkpoint was written with).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as fp32 [16]."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=4)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # The 8-bit "dynamic tree" map (Dettmers 2015, arXiv 1511.04561): one sign bit, a unary
    # exponent marking the decade 10^-6 .. 10^0, and the remaining bits a linear fraction in
    # [0.1, 1] of that decade (bin centres). Plus 0 and 1. Computed in fp32 with torch.linspace so
    # it is bit-identical to the map that bitsandbytes writes into checkpoints.
    exponent_bits = 7
    values: list[float] = []
    for i in range(exponent_bits):
        items = 2 ** (i + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * centres).tolist()
        if signed:
            values += (-scale * centres).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _dynamic_map_on(signed: bool, device: torch.device) -> torch.Tensor:
    return _dynamic_map_cpu(signed).to(device)


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map, fp32 [256], sorted (signed: index 127 = 0, 255 = 1).

    One cached tensor per device (no host-to-device copy per call); treat it as read-only.
    """
    return _dynamic_map_on(signed, torch.device(device))


def is_library_map(code: torch.Tensor) -> bool:
    """True for a map returned by `dynamic_map` (known sorted, so it needs no check)."""
    return any(code is _dynamic_map_on(s, code.device) for s in (True, False))
