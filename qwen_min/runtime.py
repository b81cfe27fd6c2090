"""Where and in what precision to run: device choice, bf16 autocast, atomic file writes, and
the provenance (git commit, date) that runs record."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm


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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N "
                         "or mps") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s), numbered from 0")
    return device


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


def compile_wanted(choice: str, device: torch.device) -> bool:
    """--compile auto|on|off → whether to compile; auto: on CUDA only (CUDA graphs), where it
    pays, not on CPU, where compiling takes longer than it saves."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


class CompileFallback:
    """--compile auto: call what `build()` returns, the compiled function, until building or
    calling it raises; from then on call `eager`, after one line on stderr saying why. The
    failing call is run again eagerly, so the caller sees no difference but the speed.
    (--compile on calls the compiled function directly: a failure there ends the run.)

    torch.compile compiles on the first call, and CUDA graphs are captured (recorded, not run)
    on the first calls, so a failure comes before the compiled function has changed anything.
    Both paths count the same FLOPs per step (qwen_min.compiled); work done eagerly before the
    failure (evaluate.py: the batch's prefill) ran, so it stays counted."""

    def __init__(self, build: Callable[[], Callable], eager: Callable, what: str):
        self.build, self.eager, self.what = build, eager, what
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = self.build()
                return self.compiled(*args, **kwargs)
            except Exception as e:  # dynamo, inductor, a missing compiler, CUDA-graph capture
                self.failed = True
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                tqdm.write(f"warning: --compile auto: {self.what} failed ({type(e).__name__}"
                           f": {reason}); continuing without compiling (pass --compile off to "
                           "skip the attempt)", file=sys.stderr)
        return self.eager(*args, **kwargs)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside `path`, then rename over it: a crash leaves old or new.

    The file gets the mode the umask gives a new file (0644 under the usual 022), as `open`
    would: the temp file is created by os.open, not mkstemp, whose 0600 the rename would
    keep. After the rename the folder is fsynced too, so that the rename itself survives a
    power loss. Any OSError (a full disk, a read-only folder) removes the temp file and is
    raised again naming `path`, not the temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return path


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (its directory entry on disk)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (network, FUSE) cannot sync a folder: no more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def os_error_line(e: OSError) -> str:
    """A failed read or write (a full disk, a read-only folder) as one line: the path, the
    system's reason and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable or choose another folder"
    else:
        fix = "fix the cause"
    return f"{where}{e.strerror or e}; {fix}, then run the same command again"


def read_json(path: str | Path) -> dict:
    """The JSON object in `path`; ValueError naming the file when it holds none (cut short,
    edited by hand, another file's contents). OSError as open raises it."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); repair or remove it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file that is only ever appended to (metrics.jsonl); [] if
    it does not exist. A line that does not parse is skipped: a kill mid-append cuts only the
    last line short, and the records before it are whole."""
    records = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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
