"""File helpers shared by the savers: atomic writes and safe safetensors reads.

Every file is written to a temporary file in the target directory, flushed to disk, then renamed
over the target: a crash or an error leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (e.g. Windows); the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; ValueError naming the file if it is missing or malformed."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str | os.PathLike, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (never pickle); ValueError naming the file if it is
    missing, truncated or corrupt."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"{path}: file not found")
    key, tensors = None, {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        where = f" (tensor {key!r})" if key else ""
        raise ValueError(f"{path}: not a valid safetensors file{where}: {exc}") from None
