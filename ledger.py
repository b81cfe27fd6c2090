"""The FLOP ledger and the budget: every counted FLOP of every run, on one append-only file.

    python flops.py --ledger runs/ledger.jsonl   # what the runs so far have used

Each line is one JSON record. A *charge* {kind, name, flops, timestamp, ...} records FLOPs that
ran (kind "train", "eval", "baseline", or anything written by hand); the total of the charges
is what the budget has spent. Beside them, runs in flight hold *reservations*:

  * Before its first step a run reserves the FLOPs it plans, under the ledger's lock, and only
    if the charges plus every live reservation plus its plan fit the budget (`reserve`). So two
    processes sharing a ledger cannot both take the same room.
  * Its charges name the reservation, and each one takes its FLOPs out of it; a clean exit
    (also Ctrl-C or an error) appends a release for what is left.
  * A reservation whose process has died (a SIGKILL, a power cut) holds nothing: it records
    its host and pid, and a pid that no longer runs on this host makes it stale. A run on
    another host holds its reservation until it releases it.
  * A process started by another that already holds a reservation (sweep.py starting train.py
    and evaluate.py) draws on that one: the parent passes its id in PARENT_ENV.

Reservation and release records carry flops 0 (what they hold is in `reserved`), so anything
that adds up the field `flops` still gets the FLOPs spent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

BUDGET = 1e17
RESERVATION, RELEASE = "reservation", "release"
PARENT_ENV = "QWEN_MIN_RESERVATION"  # a reservation id this process's FLOPs draw on


class LedgerError(ValueError):
    """A ledger line that is not a valid record."""


class BudgetError(RuntimeError):
    """A planned run would take the ledger past the FLOP budget."""


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise LedgerError(
            f"{where}: expected a JSON object (a record), got {type(record).__name__}"
        )
    for key in ("kind", "name"):
        if not isinstance(record.get(key), str):
            raise LedgerError(f"{where}: field {key!r} must be a string, got {record.get(key)!r}")
    numbers = ("flops", "reserved") if record["kind"] == RESERVATION else ("flops",)
    for key in numbers:
        n = record.get(key)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise LedgerError(
                f"{where}: field {key!r} must be a non-negative integer (counted FLOPs), got {n!r}"
            )
    return record


# ----------------------------------------------------------------------------- reading


def read_ledger(path: str | Path, reservations: bool = False) -> list[dict]:
    """The charges of a ledger ([] if it does not exist yet); with `reservations`, every
    record, the reservations and releases included."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LedgerError(
                f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be one "
                'record like {"kind": "train", "name": ..., "flops": ..., "timestamp": ...}. '
                "Repair or delete that line; the other lines are kept as they are."
            ) from None
        records.append(_check_record(record, where))
    return records if reservations else charges(records)


def charges(records: list[dict]) -> list[dict]:
    """The records of FLOPs that ran: all but the reservations and releases."""
    return [r for r in records if r["kind"] not in (RESERVATION, RELEASE)]


def ledger_total(path: str | Path) -> int:
    """FLOPs spent so far: the sum of the charges (0 if the ledger does not exist yet)."""
    return sum(r["flops"] for r in read_ledger(path))


def _alive(host: str, pid: int) -> bool:
    """Whether the process that made a reservation may still run (another host: assumed)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def held(records: list[dict]) -> dict[str, int]:
    """reservation id → the FLOPs it still holds, for every live reservation among `records`
    (all of a ledger's records: read_ledger(path, reservations=True)). What a reservation holds
    is its reserved FLOPs less the charges that name it; it is live until released, or until
    every process that reserved under it has died."""
    reserved: dict[str, int] = {}
    owners: dict[str, list[tuple[str, int]]] = {}
    spent: dict[str, int] = {}
    released = set()
    for r in records:
        rid = r.get("reservation")
        if r["kind"] == RESERVATION:
            reserved[rid] = reserved.get(rid, 0) + r["reserved"]
            owners.setdefault(rid, []).append((r.get("host"), r.get("pid")))
        elif r["kind"] == RELEASE:
            released.add(rid)
        elif rid is not None:
            spent[rid] = spent.get(rid, 0) + r["flops"]
    return {rid: max(n - spent.get(rid, 0), 0) for rid, n in reserved.items()
            if rid not in released and any(_alive(*owner) for owner in owners[rid])}


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[Path]:
    """Hold the ledger's exclusive lock: a flock on `<ledger>.lock` beside it (a separate file,
    because the ledger itself is only ever appended to, never replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the lock file is closed
        yield path


def _append_locked(path: Path, record: dict) -> None:
    """One O_APPEND write and an fsync, with the lock held: no record is lost or interleaved,
    and a record that returned is on disk."""
    record = _check_record(dict(record), f"ledger record for {path}")
    record.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        if _ends_without_newline(fd):  # a line someone wrote by hand without one
            line = b"\n" + line
        if os.write(fd, line) != len(line):
            raise OSError(errno.ENOSPC, "No space left on device (a short write)")
        os.fsync(fd)
    except OSError as e:  # a full disk: cut the half record, the ledger stays readable
        os.ftruncate(fd, size)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def append_ledger(path: str | Path, record: dict) -> None:
    """Append one record {kind, name, flops, ...} (+ timestamp, UTC) as one JSON line, safe
    with several writers (two terminals, a sweep on two GPUs)."""
    with locked(path) as path:
        _append_locked(path, record)


# ----------------------------------------------------------------------------- the budget


def _refusal(path, planned: int, spent: int, holding: int, budget: float) -> BudgetError:
    left = max(budget - spent - holding, 0)
    others = f", and runs in flight reserve {holding:.3e} more" if holding else ""
    return BudgetError(
        f"this run plans {planned:.3e} FLOPs, but {path} already records {spent:.3e} of the "
        f"{budget:.3e} budget{others} ({left:.3e} left): it would overrun by "
        f"{spent + holding + planned - budget:.3e}. Plan fewer steps or a shorter context, or "
        "pass --force to run anyway."
    )


def check_budget(
    ledger_path: str | Path, planned: int, budget: float = BUDGET, force: bool = False
) -> None:
    """Raise BudgetError if the charges plus the live reservations plus `planned` exceed
    `budget` (unless force). Only a look: `reserve` also takes the room."""
    records = read_ledger(ledger_path, reservations=True)
    spent = sum(r["flops"] for r in records)
    holding = sum(held(records).values())
    if not force and spent + holding + planned > budget:
        raise _refusal(ledger_path, planned, spent, holding, budget)


class Reservation:
    """A run's hold on the budget: its charges go through `append`, `release` ends it."""

    def __init__(self, path: Path, rid: str, name: str, owned: bool):
        self.path, self.id, self.name, self.owned = path, rid, name, owned

    def append(self, record: dict) -> None:
        """A charge of this run, taken out of the reservation."""
        append_ledger(self.path, record | {"reservation": self.id})

    def release(self) -> None:
        """Give back what is left (a parent's reservation is its owner's to release)."""
        if self.owned:
            append_ledger(self.path, {"kind": RELEASE, "name": self.name, "flops": 0,
                                      "reservation": self.id})
            self.owned = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reserve(path: str | Path, planned: int, budget: float = BUDGET, force: bool = False,
            name: str = "", parent: str | None = None) -> Reservation:
    """Reserve `planned` FLOPs for the run `name`, under the ledger's lock: BudgetError when
    the charges, the live reservations and `planned` together exceed `budget` (unless force).

    `parent` (default: $PARENT_ENV): a live reservation this run draws on. It counts as room of
    the run's own; only what the plan needs beyond it is reserved, under the parent's id."""
    parent = os.environ.get(PARENT_ENV) if parent is None else parent
    with locked(path) as path:
        records = read_ledger(path, reservations=True)
        spent = sum(r["flops"] for r in records)
        holds = held(records)
        mine = holds.pop(parent, None) if parent else None  # None: no live parent
        holding = sum(holds.values())
        if not force and spent + holding + max(planned, mine or 0) > budget:
            raise _refusal(path, planned, spent, holding, budget)
        rid = parent if mine is not None else uuid.uuid4().hex
        if planned > (mine or 0):
            _append_locked(path, {"kind": RESERVATION, "name": name, "flops": 0,
                                  "reserved": planned - (mine or 0), "reservation": rid,
                                  "host": socket.gethostname(), "pid": os.getpid()})
    return Reservation(path, rid, name, owned=mine is None)
