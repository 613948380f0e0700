"""Out-of-memory errors that say what was being allocated and which setting lowers it.

torch's message names only the bytes requested; people fine-tuning on a small GPU need to know
which knob to turn. The error stays a torch.OutOfMemoryError (callers that catch it still do),
with torch's own message kept after ours and the original chained.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def explain_oom(doing: str, remedy: str):
    """Re-raises torch.OutOfMemoryError inside the block as one that starts with
    "out of memory while <doing>. <remedy>."."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        message = f"qlora_ext: out of memory while {doing}. {remedy}. (torch: {error})"
        raise torch.OutOfMemoryError(message) from error
