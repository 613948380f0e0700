"""Loads the compiled extension `qlora_ext._C`, which registers the torch.ops.qlora_ext operators.

The package imports without it (so that documentation, references and error messages work); the
first use of an operator then says what to do.
"""

from __future__ import annotations

import importlib

_module = None
_error: Exception | None = None


def native():
    """The `_C` module; raises ImportError with a fix if the extension was not built."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is None:
        try:
            import torch  # noqa: F401  (loads libtorch before the extension that links it)

            _module = importlib.import_module("qlora_ext._C")
            return _module
        except ImportError as exc:
            _error = exc
    raise ImportError(
        "qlora_ext's compiled extension (qlora_ext._C) is not available: "
        f"{_error}. Build it with `pip install --no-build-isolation .` from the source tree "
        "(README.md), against the torch you will run with."
    ) from _error


def build_info() -> dict:
    """How the extension was built: version, CUDA on/off, architectures."""
    m = native()
    return {
        "version": m.__version__,
        "with_cuda": bool(m.with_cuda),
        "cuda_architectures": m.cuda_architectures,
    }
