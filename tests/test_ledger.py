"""The FLOP ledger (ledger.py): records, the budget check, several writers (flock'd,
append-only, fsynced: issue 11, item 2), and reservations (issue 19, items 2 and 22)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flops
import ledger

WORKER = Path(__file__).with_name("ledger_worker.py")

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


def refusal(path, planned: int, spent: int, holding: int, left: int, over: int) -> str:
    """The line a refused train.py prints on a budget of 100 (exit code 3)."""
    return (f"error: this run plans {planned:.3e} FLOPs, but {path} already records "
            f"{spent:.3e} of the 1.000e+02 budget, and runs in flight reserve {holding:.3e} more "
            f"({left:.3e} left): it would overrun by {over:.3e}. Plan fewer steps or a shorter "
            "context, or pass --force to run anyway.\n")


def reservation_record(rid: str, reserved: int, **fields) -> str:
    """A reservation as ledger.reserve writes it for this process, with `fields` changed."""
    record = {"kind": "reservation", "name": "runs/a", "flops": 0, "reserved": reserved,
              "reservation": rid, **ledger.owner(), "lease": ledger.LEASE_S,
              "timestamp": ledger.datetime.now(ledger.timezone.utc).isoformat()}
    return json.dumps(record | fields) + "\n"


def test_the_reservation_of_a_dead_process_is_stale(tmp_path):
    """A run killed before its release (SIGKILL) holds nothing: its pid no longer runs, or it
    is a zombie that its parent has not waited for yet."""
    path = tmp_path / "ledger.jsonl"
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = ledger.owner(zombie.pid)
    path.write_text(reservation_record("r1", 60, **identity))
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {"r1": 60}
    zombie.kill()
    while ledger.start_time(zombie.pid) is not None:  # until the kill lands: a zombie
        time.sleep(0.01)
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}
    zombie.wait()  # now the pid is gone altogether
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}


def test_a_live_pid_with_another_start_time_is_stale(tmp_path):
    """A pid reused: the record's pid runs, but a process that started at another time holds
    it. The reservation is stale and a run that needs its room is admitted; with the true
    start time it holds, and that run is refused."""
    path = tmp_path / "ledger.jsonl"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = ledger.owner(live.pid)
        path.write_text(reservation_record("r1", 80, **identity | {"start": identity["start"] - 1}))
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}
        ledger.reserve(path, 80, budget=100, name="runs/b").release()
        path.write_text(reservation_record("r1", 80, **identity))
        with pytest.raises(ledger.BudgetError) as e:
            ledger.reserve(path, 80, budget=100, name="runs/b")
        assert f"error: {e.value}\n" == refusal(path, 80, 0, 80, 20, 60)
    finally:
        live.kill()
        live.wait()


def test_an_owner_this_machine_cannot_check_holds_until_its_lease_lapses(tmp_path, monkeypatch):
    """Another boot id (another host, or this one before a reboot) or another PID namespace:
    the pid means nothing here. The reservation holds until `lease` seconds after its last
    refresh, and a refusal says so; off Linux every reservation follows this rule."""
    path = tmp_path / "ledger.jsonl"
    now = time.time()

    def stamp(seconds_ago: float) -> str:
        return ledger.datetime.fromtimestamp(now - seconds_ago, ledger.timezone.utc).isoformat()

    for other in ({"boot_id": "another-boot"}, {"pidns": 1}):
        path.write_text(reservation_record("r1", 80, **other, lease=60, timestamp=stamp(100)))
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}  # lapsed
        ledger.append_ledger(path, {"kind": "refresh", "name": "runs/a", "flops": 0,
                                    "reservation": "r1", "timestamp": stamp(30)})
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {"r1": 80}
    with pytest.raises(ledger.BudgetError) as e:
        ledger.reserve(path, 80, budget=100)
    lapse = ledger.datetime.fromtimestamp(int(now - 30) + 60, ledger.timezone.utc)
    assert str(e.value).endswith(
        "it would overrun by 6.000e+01. 8.000e+01 of those are held by runs on another host or "
        "in another PID namespace, which this machine cannot check: they lapse at "
        f"{lapse:%Y-%m-%d %H:%M:%S} UTC unless their runs refresh them. Plan fewer steps or a "
        "shorter context, or pass --force to run anyway.")
    # off Linux (no boot id, no /proc): a dead pid of this process's own record still holds
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path.write_text(reservation_record("r2", 80, pid=int(dead.stdout), lease=60,
                                       timestamp=stamp(30)))
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}
    monkeypatch.setattr(ledger, "_this_machine", lambda: None)
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {"r2": 80}


def start_worker(tmp_path, name: str, prefix: tuple[str, ...] = (), **spec) -> subprocess.Popen:
    """tests/ledger_worker.py on tmp_path's ledger (budget 100): its spec's fields, and a
    `report` file <name>.json that says its pid and reservation id once it has reserved."""
    spec = {"ledger": str(tmp_path / "ledger.jsonl"), "name": name,
            "report": str(tmp_path / f"{name}.json")} | spec
    return subprocess.Popen([*prefix, sys.executable, str(WORKER), json.dumps(spec)],
                            stderr=subprocess.PIPE, text=True)


def reported(tmp_path, name: str, proc: subprocess.Popen | None = None) -> dict:
    """{pid, id} of worker `name`, once it has reserved (proc: stop waiting when it ends)."""
    report = tmp_path / f"{name}.json"
    while not report.exists():
        assert proc is None or proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    return json.loads(report.read_text())


def third_run(tmp_path, plan: int) -> tuple[int, str]:
    """A third process planning `plan`: (exit code, what it printed)."""
    proc = start_worker(tmp_path, "third", plan=plan)
    return proc.wait(timeout=60), proc.stderr.read()


@pytest.mark.slow
def test_a_reservation_in_another_pid_namespace_holds_while_it_is_refreshed(tmp_path):
    """A run in its own PID namespace (a container: `unshare -Urpf --mount-proc`, same host
    name, a pid that means nothing here) reserves 80 of 100 with a 4 s lease. Its pid cannot
    be checked from here, so its reservation holds while it refreshes it (past the lease),
    and lapses a lease after its last refresh once it is killed. Slow: it waits out leases."""
    probe = subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True,
                           text=True)
    if probe.returncode:
        pytest.skip(f"no PID namespace here: unshare -Urpf --mount-proc: {probe.stderr.strip()}")
    path, lease = tmp_path / "ledger.jsonl", 4.0
    # forks first: the worker's pid in its namespace (about 200) is then one that the
    # host's view does not run (pid 1, its init, would look alive to a pid-only check)
    inside = ("unshare", "-Urpf", "--mount-proc", "--kill-child", "sh", "-c",
              'for i in $(seq 200); do /bin/true; done; "$0" "$@"')
    contained = start_worker(tmp_path, "contained", inside, plan=80, lease=lease,
                             go=str(tmp_path / "never"))
    reported(tmp_path, "contained", contained)
    record = ledger.read_ledger(path, reservations=True)[0]
    assert (record["boot_id"], record["pidns"]) != ledger._this_machine()
    assert record["boot_id"] == ledger.owner()["boot_id"] and record["host"] == socket.gethostname()
    unchecked = refusal(path, 80, 0, 80, 20, 60).replace(" Plan fewer", (
        " 8.000e+01 of those are held by runs on another host or in another PID namespace, "
        "which this machine cannot check: they lapse at TIME UTC unless their runs refresh "
        "them. Plan fewer"))
    code, line = third_run(tmp_path, 80)
    assert code == 3 and re.fullmatch(
        re.escape(unchecked).replace("TIME", r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), line), line
    time.sleep(lease + 0.5)  # past its lease: its refreshes keep it
    assert third_run(tmp_path, 80)[0] == 3
    assert sum(r["kind"] == "refresh" for r in ledger.read_ledger(path, reservations=True)) >= 3
    contained.kill()  # unshare, and through --kill-child everything in the namespace
    contained.wait()
    killed = time.time()
    assert third_run(tmp_path, 80)[0] == 3  # its last refresh is at most lease/3 old
    time.sleep(max(killed + lease + 0.5 - time.time(), 0))
    assert third_run(tmp_path, 80) == (0, "")


def test_two_children_at_once_take_their_parents_room_once(tmp_path, monkeypatch):
    """The parent holds 40 of 100; two children run at once, planning 40 each. The first takes
    the parent's 40, the second 40 more from the budget: a third run planning 60 is refused,
    and the ledger ends at 80 spent."""
    path = tmp_path / "ledger.jsonl"
    parent = ledger.reserve(path, 40, budget=100, name="sweep")
    monkeypatch.setenv(ledger.PARENT_ENV, parent.id)
    go = tmp_path / "go"
    children = [start_worker(tmp_path, name, plan=40, spend=[40], go=str(go))
                for name in ("a", "b")]
    ids = [reported(tmp_path, name, proc)["id"] for name, proc in zip("ab", children)]
    monkeypatch.delenv(ledger.PARENT_ENV)
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {
        parent.id: 0, ids[0]: 40, ids[1]: 40}
    assert third_run(tmp_path, 60) == (3, refusal(path, 60, 0, 80, 20, 40))
    go.touch()
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {parent.id: 0}
    parent.release()
    assert ledger.ledger_total(path) == 80
    assert third_run(tmp_path, 20) == (0, "")


def test_a_child_holds_its_room_after_its_parent_is_killed(tmp_path):
    """kill -9 of the parent (sweep.py) while its child (train.py) runs: the parent's hold
    goes, the child's stays while the child lives, so a third run is refused until the child
    ends; then the child's spending is on the ledger and the rest is free again."""
    path = tmp_path / "ledger.jsonl"
    go = tmp_path / "go"
    parent = start_worker(tmp_path, "parent", plan=80,
                          children=[{"ledger": str(path), "name": "child", "plan": 80,
                                     "spend": [30], "go": str(go),
                                     "report": str(tmp_path / "child.json")}])
    child = reported(tmp_path, "child", parent)
    assert third_run(tmp_path, 80) == (3, refusal(path, 80, 0, 80, 20, 60))
    parent.kill()
    parent.wait()
    assert ledger.start_time(child["pid"]) is not None  # the child runs on, an orphan
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {child["id"]: 80}
    assert third_run(tmp_path, 80) == (3, refusal(path, 80, 0, 80, 20, 60))
    go.touch()
    while ledger.start_time(child["pid"]) is not None:
        time.sleep(0.02)
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}
    assert ledger.ledger_total(path) == 30
    assert third_run(tmp_path, 80) == (3, refusal(path, 80, 30, 0, 70, 10).replace(
        ", and runs in flight reserve 0.000e+00 more", ""))
    assert third_run(tmp_path, 70) == (0, "")


def test_a_child_draws_on_its_parents_reservation(tmp_path, monkeypatch):
    """sweep.py reserves a whole run (training + evaluation) and hands the id to its children
    in $QWEN_MIN_RESERVATION: each reserves on its own, taking what it plans out of what the
    parent still holds first, and the parent releases what is left at the end."""
    path = tmp_path / "ledger.jsonl"
    parent = ledger.reserve(path, 80, budget=100, name="sweep/run")
    monkeypatch.setenv(ledger.PARENT_ENV, parent.id)
    with ledger.reserve(path, 50, budget=100, name="sweep/run") as train:
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {
            parent.id: 30, train.id: 50}
        train.append({"kind": "train", "name": "sweep/run", "flops": 45})
    # the 5 the child did not spend are the parent's again
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {parent.id: 35}
    with ledger.reserve(path, 40, budget=100, name="sweep/run/eval") as evaluation:
        # 35 of the parent's, 5 more from the budget
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {
            parent.id: 0, evaluation.id: 40}
        evaluation.append({"kind": "eval", "name": "sweep/run/eval", "flops": 40})
    with pytest.raises(ledger.BudgetError):  # 85 spent: 16 more does not fit
        ledger.reserve(path, 16, budget=100)
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {parent.id: 0}
    parent.release()
    kinds = [r["kind"] for r in ledger.read_ledger(path, reservations=True)]
    assert kinds == ["reservation", "reservation", "train", "release", "reservation", "eval",
                     "release", "release"]
    assert [r.get("from_parent") for r in ledger.read_ledger(path, reservations=True)
            if r["kind"] == "reservation"] == [None, 50, 35]


def test_a_cut_record_at_the_end_does_not_stop_a_later_run(tmp_path):
    """A writer killed mid-append (a crash, a power cut) leaves a last line without its end:
    reading skips it, and the next append removes it. A bad line inside the file still
    stops the run (test_corrupt_ledger_line_names_file_and_line)."""
    path = tmp_path / "ledger.jsonl"
    ledger.append_ledger(path, {"kind": "train", "name": "a", "flops": 5})
    whole = path.read_bytes()
    cut = b'{"kind": "train", "name": "b", "fl'
    path.write_bytes(whole + cut)
    assert ledger.ledger_total(path) == 5
    with ledger.reserve(path, 95, budget=100, name="c") as booking:
        booking.append({"kind": "train", "name": "c", "flops": 95})
    assert cut not in path.read_bytes() and path.read_bytes().startswith(whole)
    assert [r["name"] for r in ledger.read_ledger(path)] == ["a", "c"]


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


# ----------------------------------------------------------------------------- stress


def running(marker: str) -> list[int]:
    """Pids of the live processes whose command line holds `marker` (zombies have none)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def random_runs(rng: random.Random, tmp_path: Path, n: int = 8) -> list[dict]:
    """The specs of `n` workers with random plans, each either started by the test (those
    returned) or a child of an earlier one; runs with children spend nothing themselves (as
    sweep.py), the others spend up to their plan in a few charges."""
    specs, every = [], []
    for i in range(n):
        spec = {"ledger": str(tmp_path / "ledger.jsonl"), "name": f"w{i}",
                "report": str(tmp_path / f"w{i}.json"), "plan": rng.randint(10, 60),
                "pause": rng.uniform(0.05, 0.3), "children": []}
        spec["spend"] = [rng.randint(0, spec["plan"] // 4) for _ in range(rng.randint(1, 4))]
        if every and rng.random() < 0.4:
            parent = rng.choice(every)
            parent["children"].append(spec)
            parent["spend"] = []
        else:
            specs.append(spec)
        every.append(spec)
    return specs


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_random_runs_children_and_kills_never_overrun_the_budget(tmp_path, seed):
    """8 processes with random plans on a budget of 100, some started by others (children
    drawing on their parent's reservation), started at random moments; a few killed with
    SIGKILL at random moments, parents included; and now and then a record cut short at the
    end of the ledger (a writer dying mid-append). Throughout, the FLOPs spent plus those held
    never exceed the budget; once every process is gone, nothing is held; no run stops on a
    cut record. Each seed takes about 2 s."""
    rng = random.Random(seed)
    path = tmp_path / "ledger.jsonl"
    top = random_runs(rng, tmp_path)
    events = sorted([(rng.uniform(0, 0.6), "start", spec) for spec in top]
                    + [(rng.uniform(0.2, 1.2), "kill", None) for _ in range(rng.randint(1, 3))]
                    + [(rng.uniform(0, 1.5), "cut", None) for _ in range(2)],
                    key=lambda e: e[0])
    log = (tmp_path / "stderr.txt").open("w")
    procs, killed, t0 = [], 0, time.time()

    def check() -> None:
        """The budget holds, and every reservation held has its owner among the processes
        that run (by their command lines: a check apart from the ledger's own)."""
        time.sleep(0.02)
        before = running(str(path))
        records = ledger.read_ledger(path, reservations=True)
        holds = ledger.held(records)
        owners = {r["reservation"]: r["pid"] for r in records if r["kind"] == "reservation"}
        assert {owners[rid] for rid in holds} <= set(before + running(str(path))), records
        spent = sum(r["flops"] for r in records)
        assert spent + sum(holds.values()) <= 100, records

    for at, action, spec in events:
        while time.time() - t0 < at:
            check()
        if action == "start":
            procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)],
                                          stderr=log))
        elif action == "kill":
            if alive := running(str(path)):
                os.kill(rng.choice(sorted(alive)), signal.SIGKILL)
                killed += 1
        else:
            with ledger.locked(path), path.open("ab") as f:
                f.write(b'{"kind": "train", "name": "cut", "fl')
    while running(str(path)):
        check()
    for p in procs:
        p.wait()
    check()
    records = ledger.read_ledger(path, reservations=True)
    assert ledger.held(records) == {}
    errors = (tmp_path / "stderr.txt").read_text().splitlines()
    assert all(line.startswith("error: this run plans ") for line in errors), errors
    with ledger.reserve(path, 100 - ledger.ledger_total(path), budget=100):
        pass
    reservations = [r for r in records if r["kind"] == "reservation"]
    print(f"seed {seed}: {len(reservations)} admitted "
          f"({sum('parent' in r for r in reservations)} children), {len(errors)} refused, "
          f"{8 - len(reservations) - len(errors)} not started (their parent was refused or "
          f"killed first), {killed} killed, {ledger.ledger_total(path)} of 100 spent, "
          f"{round(time.time() - t0, 1)} s")
