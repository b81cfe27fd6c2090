"""The FLOP ledger (ledger.py): records, the budget check, several writers (flock'd,
append-only, fsynced: issue 11, item 2), and reservations (issue 19, items 2 and 22)."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import flops
import ledger

APPENDS = 200


def append_many(path: str, writer: str, start, appends: int = APPENDS) -> None:
    start.wait()  # both writers go at once
    for i in range(appends):
        ledger.append_ledger(path, {"kind": "train", "name": writer, "flops": i + 1, "i": i})


def test_two_processes_appending_at_once_lose_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("fork")  # the test module is already imported: cheap
    start = ctx.Barrier(2)
    writers = [ctx.Process(target=append_many, args=(str(path), name, start))
               for name in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    records = ledger.read_ledger(path)  # every line parses as a record
    assert len(records) == 2 * APPENDS
    for name in ("a", "b"):  # each writer's records are all there, in its own order
        assert [r["i"] for r in records if r["name"] == name] == list(range(APPENDS))
    assert ledger.ledger_total(path) == 2 * APPENDS * (APPENDS + 1) // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl", "ledger.jsonl.lock"]


def test_append_after_a_hand_written_line_without_newline(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"kind": "manual", "name": "cloud run", "flops": 5}')  # no final newline
    ledger.append_ledger(path, {"kind": "train", "name": "runs/a", "flops": 7})
    lines = path.read_text().splitlines()
    assert lines[0] == '{"kind": "manual", "name": "cloud run", "flops": 5}'
    assert json.loads(lines[1])["flops"] == 7 and len(lines) == 2
    assert ledger.ledger_total(path) == 12



def test_ledger_appends_records_with_timestamps(tmp_path):
    path = tmp_path / "runs" / "ledger.jsonl"
    assert ledger.ledger_total(path) == 0 and ledger.read_ledger(path) == []
    ledger.append_ledger(path, {"kind": "train", "name": "runs/a", "flops": 10**16, "steps": 5})
    ledger.append_ledger(path, {"kind": "eval", "name": "runs/a", "flops": 7})
    records = ledger.read_ledger(path)
    assert [(r["kind"], r["flops"]) for r in records] == [("train", 10**16), ("eval", 7)]
    assert records[0]["steps"] == 5
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["timestamp"]) for r in records
    )
    assert ledger.ledger_total(path) == 10**16 + 7
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.jsonl", "ledger.jsonl.lock"]


def test_ledger_rejects_a_bad_record_and_keeps_the_file(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger.append_ledger(path, {"kind": "train", "name": "a", "flops": 1})
    with pytest.raises(ledger.LedgerError) as e:
        ledger.append_ledger(path, {"kind": "train", "name": "b", "flops": 2.5e12})
    assert str(e.value) == (
        f"ledger record for {path}: field 'flops' must be a non-negative integer "
        "(counted FLOPs), got 2500000000000.0"
    )
    assert ledger.ledger_total(path) == 1


def test_corrupt_ledger_line_names_file_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"kind": "train", "name": "a", "flops": 5}\n\n{"kind": "train", "na\n')
    with pytest.raises(ledger.LedgerError) as e:
        ledger.read_ledger(path)
    assert str(e.value) == (
        f"{path}, line 3: not valid JSON (Unterminated string starting at, column 19); each "
        'line must be one record like {"kind": "train", "name": ..., "flops": ..., '
        '"timestamp": ...}. Repair or delete that line; the other lines are kept as they are.'
    )
    path.write_text('{"kind": "train", "name": "a"}\n')
    with pytest.raises(ledger.LedgerError) as e:
        ledger.ledger_total(path)
    assert str(e.value) == (
        f"{path}, line 1: field 'flops' must be a non-negative integer (counted FLOPs), got None"
    )


def test_check_budget_refuses_unless_forced(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger.check_budget(path, 10**17)  # an empty ledger: exactly the budget is allowed
    ledger.append_ledger(path, {"kind": "train", "name": "a", "flops": 6 * 10**16})
    ledger.check_budget(path, 4 * 10**16)
    with pytest.raises(ledger.BudgetError) as e:
        ledger.check_budget(path, 5 * 10**16)
    assert str(e.value) == (
        f"this run plans 5.000e+16 FLOPs, but {path} already records 6.000e+16 of the "
        "1.000e+17 budget (4.000e+16 left): it would overrun by 1.000e+16. Plan fewer steps "
        "or a shorter context, or pass --force to run anyway."
    )
    ledger.check_budget(path, 5 * 10**16, force=True)
    with pytest.raises(ledger.BudgetError,
                       match="of the 1.000e\\+15 budget \\(0.000e\\+00 left\\)"):
        ledger.check_budget(path, 1, budget=1e15)


# ----------------------------------------------------------------------------- the lock


def hold_lock(path, locked, release) -> None:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        locked.set()
        release.wait(60)


def test_an_append_waits_for_the_lock(tmp_path):
    """While another process holds `<ledger>.lock`, an append writes nothing; its record
    appears once the lock is released. (Single O_APPEND lines do not interleave, so the
    two-writer test above cannot see a missing lock.)"""
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(tmp_path / "ledger.jsonl.lock", locked, release))
    holder.start()
    assert locked.wait(60)
    writer = ctx.Process(target=ledger.append_ledger,
                         args=(path, {"kind": "train", "name": "a", "flops": 5}))
    writer.start()
    time.sleep(1.0)  # the writer has long reached the lock (an unlocked append: ~1 ms)
    assert writer.is_alive() and not path.exists()
    release.set()
    for p in (holder, writer):
        p.join(timeout=60)
    assert (holder.exitcode, writer.exitcode) == (0, 0)
    assert [r["flops"] for r in ledger.read_ledger(path)] == [5]


def test_each_append_is_fsynced_before_it_returns(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    synced = []  # (inode, bytes in the file) at each fsync

    def spy(fd):
        synced.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))

    monkeypatch.setattr(os, "fsync", spy)
    for n in (1, 2):
        ledger.append_ledger(path, {"kind": "train", "name": "a", "flops": n})
        # the ledger itself was synced, holding every line written so far
        assert synced[-1] == (path.stat().st_ino, path.stat().st_size)
        assert len(synced) == n


# ----------------------------------------------------------------------------- reservations


def test_a_reservation_holds_room_until_its_run_releases_it(tmp_path):
    """Budget 100: a run reserves 60; a second one planning 50 is refused while the first is
    in flight; each charge of the first takes its FLOPs out of the reservation; the release
    gives back the rest."""
    path = tmp_path / "ledger.jsonl"
    first = ledger.reserve(path, 60, budget=100, name="runs/a")
    with pytest.raises(ledger.BudgetError) as e:
        ledger.reserve(path, 50, budget=100, name="runs/b")
    assert str(e.value) == (
        f"this run plans 5.000e+01 FLOPs, but {path} already records 0.000e+00 of the "
        "1.000e+02 budget, and runs in flight reserve 6.000e+01 more (4.000e+01 left): it "
        "would overrun by 1.000e+01. Plan fewer steps or a shorter context, or pass --force to "
        "run anyway.")
    first.append({"kind": "train", "name": "runs/a", "flops": 45})
    records = ledger.read_ledger(path, reservations=True)
    assert ledger.held(records) == {first.id: 15}
    assert ledger.ledger_total(path) == 45  # reservations are not spent FLOPs
    with pytest.raises(ledger.BudgetError):
        ledger.check_budget(path, 41, budget=100)  # 45 spent + 15 held + 41 > 100
    first.release()
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}
    with ledger.reserve(path, 55, budget=100, name="runs/b"):  # 45 + 55: fits exactly
        pass
    assert [r["kind"] for r in ledger.read_ledger(path, reservations=True)] == [
        "reservation", "train", "release", "reservation", "release"]
    assert [r["kind"] for r in ledger.read_ledger(path)] == ["train"]


def test_the_reservation_of_a_dead_process_is_stale(tmp_path):
    """A run killed before its release (SIGKILL) holds nothing: its pid no longer runs."""
    path = tmp_path / "ledger.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    for host, holds in ((socket.gethostname(), {}), ("another-host", {"r1": 60})):
        path.write_text(json.dumps({"kind": "reservation", "name": "runs/a", "flops": 0,
                                    "reserved": 60, "reservation": "r1", "host": host,
                                    "pid": pid}) + "\n")
        # another host's pid cannot be asked: its reservation holds until it is released
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == holds
    live = json.loads(path.read_text()) | {"host": socket.gethostname(), "pid": os.getpid()}
    path.write_text(json.dumps(live) + "\n")
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {"r1": 60}


def test_a_child_draws_on_its_parents_reservation(tmp_path, monkeypatch):
    """sweep.py reserves a whole run (training + evaluation) and hands the id to its children
    in $QWEN_MIN_RESERVATION: they fit inside it, take only what they need beyond it, and
    leave the release to the parent."""
    path = tmp_path / "ledger.jsonl"
    parent = ledger.reserve(path, 80, budget=100, name="sweep/run")
    monkeypatch.setenv(ledger.PARENT_ENV, parent.id)
    with ledger.reserve(path, 50, budget=100, name="sweep/run") as train:
        assert train.id == parent.id
        train.append({"kind": "train", "name": "sweep/run", "flops": 50})
    with ledger.reserve(path, 40, budget=100, name="sweep/run/eval") as evaluation:
        # 30 of the parent's 80 left; the other 10 are reserved under the parent's id
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {parent.id: 40}
        evaluation.append({"kind": "eval", "name": "sweep/run/eval", "flops": 40})
    with pytest.raises(ledger.BudgetError):  # 90 spent: 11 more does not fit
        ledger.reserve(path, 11, budget=100)
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {parent.id: 0}
    parent.release()
    kinds = [r["kind"] for r in ledger.read_ledger(path, reservations=True)]
    assert kinds == ["reservation", "train", "reservation", "eval", "release"]


def test_flops_cli_shows_reserved_flops_apart_from_the_used(tmp_path, capsys):
    path = tmp_path / "ledger.jsonl"
    ledger.append_ledger(path, {"kind": "train", "name": "r1", "flops": 123})
    with ledger.reserve(path, 10**15, name="r2"):
        flops.main(["--json", "--ledger", str(path), "--lora-rank", "0"])
        got = json.loads(capsys.readouterr().out)["ledger"]
        assert (got["used"], got["reserved"], got["records"]) == (123, 10**15, 1)
        assert got["by_kind"] == {"train": 123} and got["left"] == 1e17 - 123 - 10**15
        flops.main(["--ledger", str(path)])
        out = capsys.readouterr().out
        assert (f"Ledger {path}: 1 records, 1.2300e+02 FLOPs used = 0.00% of 1e+17, "
                "1.0000e+15 reserved by runs in flight; 9.9000e+16 left") in out
