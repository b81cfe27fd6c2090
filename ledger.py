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
  * A reservation names its owner by the machine's boot id, the PID namespace, the pid and the
    process's start time (`owner`). Where all four can be checked from here (the same boot and
    PID namespace, on Linux), it is live exactly while that process runs: a dead process, a
    zombie, or a pid reused by another process holds nothing. Otherwise (another host, a
    container's own PID namespace, a machine without /proc) it is live until `lease` seconds
    after its last refresh: every reservation refreshes itself every lease/3 seconds while it
    is held (a "refresh" record).
  * A process started by another that holds a reservation (sweep.py starting train.py and
    evaluate.py) reserves on its own, naming the parent's id from PARENT_ENV: it takes what it
    plans out of the parent's hold first, and only the rest from the budget. The parent's hold
    shrinks by what the child took while the child's reservation is live; when it ends, the
    parent gets back what the child did not spend. So two children never spend the same FLOPs,
    and a child holds its room while it runs, whether its parent still does or not.
  * A last line with no newline that is not a record is an append cut short (a crash
    mid-write): reading skips it, and the next append removes it.

Reservation, refresh and release records carry flops 0 (what a reservation holds is in
`reserved`), so anything that adds up the field `flops` still gets the FLOPs spent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

BUDGET = 1e17
RESERVATION, REFRESH, RELEASE = "reservation", "refresh", "release"
PARENT_ENV = "QWEN_MIN_RESERVATION"  # a reservation id this process's FLOPs draw on
LEASE_S = 900.0  # how long a reservation that cannot be checked here outlives its last refresh


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
    record, the reservations, refreshes and releases included."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")  # the last item follows the final newline
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == len(lines):  # no newline after it: an append cut short, not a record
                continue
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            column = f", column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise LedgerError(
                f"{where}: not valid JSON ({why}{column}); each line must be one "
                'record like {"kind": "train", "name": ..., "flops": ..., "timestamp": ...}. '
                "Repair or delete that line; the other lines are kept as they are."
            ) from None
        records.append(_check_record(record, where))
    return records if reservations else charges(records)


def charges(records: list[dict]) -> list[dict]:
    """The records of FLOPs that ran: all but the reservations, refreshes and releases."""
    return [r for r in records if r["kind"] not in (RESERVATION, REFRESH, RELEASE)]


def ledger_total(path: str | Path) -> int:
    """FLOPs spent so far: the sum of the charges (0 if the ledger does not exist yet)."""
    return sum(r["flops"] for r in read_ledger(path))


# ----------------------------------------------------------------------------- owners


def _this_machine() -> tuple[str, int] | None:
    """(boot id, PID namespace inode) of this process: pids mean the same only where both
    match. None off Linux (no /proc)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return boot_id, os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat, field 22); None
    when no such process runs here (gone, or a zombie: it has exited) or off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 2, the command name, is in parentheses and may itself hold spaces and ')'
    fields = stat[stat.rindex(")") + 2 :].split()  # fields 3, 4, …
    return None if fields[0] in ("Z", "X") else int(fields[22 - 3])


def owner(pid: int | None = None) -> dict:
    """The identity a reservation records for process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    machine = _this_machine()
    boot_id, pidns = machine or (None, None)
    return {"host": socket.gethostname(), "boot_id": boot_id, "pidns": pidns, "pid": pid,
            "start": start_time(pid)}


def _seconds(record: dict) -> float:
    """A record's timestamp as seconds since the epoch (none: long ago)."""
    stamp = record.get("timestamp")
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _holds(records: list[dict], now: float) -> dict[str, tuple[int, float | None]]:
    """reservation id → (FLOPs it still holds, when it lapses unless refreshed: None where its
    owner is checked by pid) for every live reservation among `records`."""
    first: dict[str, dict] = {}
    reserved: dict[str, int] = {}
    last_seen: dict[str, float] = {}
    spent: dict[str, int] = {}
    released = set()
    for r in records:
        rid = r.get("reservation")
        if r["kind"] == RESERVATION:
            first.setdefault(rid, r)
            reserved[rid] = reserved.get(rid, 0) + r["reserved"]
        elif r["kind"] == RELEASE:
            released.add(rid)
        elif rid is not None:
            spent[rid] = spent.get(rid, 0) + r["flops"]
        if r["kind"] in (RESERVATION, REFRESH):
            last_seen[rid] = max(last_seen.get(rid, 0.0), _seconds(r))
    machine = _this_machine()  # a pid means the same here only with the same boot and namespace
    lapses: dict[str, float | None] = {}
    for rid, r in first.items():
        if rid in released:
            continue
        if machine is not None and (r.get("boot_id"), r.get("pidns")) == machine:
            if start_time(r["pid"]) == r.get("start"):
                lapses[rid] = None
        elif now < (lapse := last_seen[rid] + r.get("lease", LEASE_S)):
            lapses[rid] = lapse
    taken: dict[str, int] = {}  # parent id → what its children took out of its hold
    for rid, r in first.items():
        if parent := r.get("parent"):
            n = r.get("from_parent", 0)
            n = n if rid in lapses else min(spent.get(rid, 0), n)  # an ended child gives back
            taken[parent] = taken.get(parent, 0) + n
    return {rid: (max(reserved[rid] - spent.get(rid, 0) - taken.get(rid, 0), 0), lapse)
            for rid, lapse in lapses.items()}


def held(records: list[dict]) -> dict[str, int]:
    """reservation id → the FLOPs it still holds, for every live reservation among `records`
    (all of a ledger's records: read_ledger(path, reservations=True)). What a reservation holds
    is its reserved FLOPs less its charges and less what live children took from it; it is
    live until released, or until its owner is gone (see the module's docstring)."""
    return {rid: n for rid, (n, _) in _holds(records, time.time()).items()}


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
        if tail := _unterminated_tail(fd, size):
            if _is_json(tail):  # a line someone wrote by hand without a newline
                line = b"\n" + line
            else:  # an append cut short: never a record
                size -= len(tail)
                os.ftruncate(fd, size)
        if os.write(fd, line) != len(line):
            raise OSError(errno.ENOSPC, "No space left on device (a short write)")
        os.fsync(fd)
    except OSError as e:  # a full disk: cut the half record, the ledger stays readable
        os.ftruncate(fd, size)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _unterminated_tail(fd: int, size: int) -> bytes:
    """What follows the file's last newline (b"" when it ends with one), read backwards."""
    tail, end = b"", size
    while end > 0 and b"\n" not in tail:
        start = max(end - 4096, 0)
        tail, end = os.pread(fd, end - start, start) + tail, start
    return tail[tail.rfind(b"\n") + 1 :]


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return False
    return True


def append_ledger(path: str | Path, record: dict) -> None:
    """Append one record {kind, name, flops, ...} (+ timestamp, UTC) as one JSON line, safe
    with several writers (two terminals, a sweep on two GPUs)."""
    with locked(path) as path:
        _append_locked(path, record)


# ----------------------------------------------------------------------------- the budget


def _refusal(path, planned: int, spent: int, holding: int, budget: float,
             unchecked: list[tuple[int, float]]) -> BudgetError:
    """The refusal's one line; `unchecked`: (FLOPs, lapse time) of the holds judged by their
    refreshes, named apart, since this machine cannot tell whether their runs still run."""
    left = max(budget - spent - holding, 0)
    others = f", and runs in flight reserve {holding:.3e} more" if holding else ""
    unseen = ""
    if unchecked:
        lapse = datetime.fromtimestamp(max(t for _, t in unchecked), timezone.utc)
        unseen = (f" {sum(n for n, _ in unchecked):.3e} of those are held by runs on another host "
                  "or in another PID namespace, which this machine cannot check: they lapse at "
                  f"{lapse:%Y-%m-%d %H:%M:%S} UTC unless their runs refresh them.")
    return BudgetError(
        f"this run plans {planned:.3e} FLOPs, but {path} already records {spent:.3e} of the "
        f"{budget:.3e} budget{others} ({left:.3e} left): it would overrun by "
        f"{spent + holding + planned - budget:.3e}.{unseen} Plan fewer steps or a shorter "
        "context, or pass --force to run anyway."
    )


def _room(records: list[dict], parent: str | None, planned: int
          ) -> tuple[int, int, int, list[tuple[int, float]]]:
    """(FLOPs spent, FLOPs held by others, what this run takes out of its parent's hold, the
    unchecked holds) for a run planning `planned` under the live reservation `parent`."""
    spent = sum(r["flops"] for r in records)
    holds = _holds(records, time.time())
    taken = min(planned, holds[parent][0]) if parent in holds else 0
    unchecked = [(n, lapse) for rid, (n, lapse) in holds.items() if lapse is not None and n
                 and rid != parent]
    return spent, sum(n for n, _ in holds.values()) - taken, taken, unchecked


def check_budget(
    ledger_path: str | Path, planned: int, budget: float = BUDGET, force: bool = False
) -> None:
    """Raise BudgetError if the charges plus the live reservations plus `planned` exceed
    `budget` (unless force). Only a look: `reserve` also takes the room."""
    spent, holding, _, unchecked = _room(read_ledger(ledger_path, reservations=True), None,
                                         planned)
    if not force and spent + holding + planned > budget:
        raise _refusal(ledger_path, planned, spent, holding, budget, unchecked)


class Reservation:
    """A run's hold on the budget: its charges go through `append`, `release` ends it. While it
    is held, a thread refreshes it every lease/3 seconds, for the processes that cannot check
    its owner by pid."""

    def __init__(self, path: Path, rid: str, name: str, lease: float):
        self.path, self.id, self.name = path, rid, name
        self._released = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, args=(lease / 3,), daemon=True,
                                           name=f"ledger refresh {rid}")
        self._refresher.start()

    def _refresh(self, every: float) -> None:
        while not self._released.wait(every):
            with contextlib.suppress(OSError):  # a full disk: try again at the next beat
                append_ledger(self.path, {"kind": REFRESH, "name": self.name, "flops": 0,
                                          "reservation": self.id})

    def append(self, record: dict) -> None:
        """A charge of this run, taken out of the reservation."""
        append_ledger(self.path, record | {"reservation": self.id})

    def release(self) -> None:
        """Give back what is left (to the parent's hold, for a child)."""
        if not self._released.is_set():
            self._released.set()
            self._refresher.join()
            append_ledger(self.path, {"kind": RELEASE, "name": self.name, "flops": 0,
                                      "reservation": self.id})

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reserve(path: str | Path, planned: int, budget: float = BUDGET, force: bool = False,
            name: str = "", parent: str | None = None) -> Reservation:
    """Reserve `planned` FLOPs for the run `name`, under the ledger's lock: BudgetError when
    the charges, the live reservations and `planned` together exceed `budget` (unless force).

    `parent` (default: $PARENT_ENV): a live reservation this run draws on. What the parent
    still holds counts as room of this run's own: the new reservation takes up to `planned`
    out of it (recorded as from_parent) and only the rest from the budget."""
    parent = os.environ.get(PARENT_ENV) if parent is None else parent
    with locked(path) as path:
        spent, holding, taken, unchecked = _room(read_ledger(path, reservations=True), parent,
                                                 planned)
        if not force and spent + holding + planned > budget:
            raise _refusal(path, planned, spent, holding, budget, unchecked)
        rid = uuid.uuid4().hex
        family = {"parent": parent, "from_parent": taken} if parent else {}
        _append_locked(path, {"kind": RESERVATION, "name": name, "flops": 0, "reserved": planned,
                              "reservation": rid, **family, **owner(), "lease": LEASE_S})
    return Reservation(path, rid, name, LEASE_S)
