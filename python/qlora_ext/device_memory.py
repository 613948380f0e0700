"""How much more memory this process may take on a CUDA device: what the paths that size
themselves (the MLP's chunks, the fused loss's chunks, PagedAdamW's resident pages) ask.

The driver's free memory alone misses both ends: PyTorch's allocator keeps freed blocks cached
(usable by the next allocation, invisible to the driver), and `torch.cuda.set_per_process_memory_fraction`
caps the process below what the driver has free (a 24 GiB cap on an 80 GB card leaves ~55 GB
"free" that the allocator will refuse).
"""

from __future__ import annotations

import torch


def available_bytes(device: torch.device | str | int) -> int:
    """Bytes the caching allocator can still hand out on `device`: the driver's free memory plus
    the allocator's cached but unused blocks, at most the per-process cap less what is allocated."""
    if isinstance(device, (str, torch.device)) and torch.device(device).type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device!r}")
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + max(0, torch.cuda.memory_reserved(device) - allocated)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(device) if get_fraction is not None else 1.0
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(0, available)
