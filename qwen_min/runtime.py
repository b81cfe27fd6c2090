"""Where and in what precision to run: device choice, bf16 autocast, atomic file writes, and
the provenance (git commit, date) that runs record."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → cuda, then mps, then cpu; anything else is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls then run several times faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: be conservative
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto|bf16|fp32 → the autocast dtype (fp32 means no autocast)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise SystemExit(f"--dtype must be auto, bf16 or fp32, got {name!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside `path`, then rename over it: a crash leaves old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _git(*args: str) -> str | None:
    """Output of a git command run in this repository; None without git or outside a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def provenance() -> dict:
    """Which code made a result, and when: {"git_commit", "git_dirty", "date"} (UTC, ISO 8601).

    git_commit and git_dirty are None where git or the checkout is missing (an installed copy);
    git_dirty is True when tracked files differ from the commit, so the commit alone does not
    reproduce the result."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": None if status is None else bool(status.strip()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
