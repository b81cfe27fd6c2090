"""The FLOP ledger under several writers: flock'd, append-only, fsynced (issue 11, item 2)."""

from __future__ import annotations

import json
import multiprocessing

import flops

APPENDS = 200


def append_many(path: str, writer: str, start, appends: int = APPENDS) -> None:
    start.wait()  # both writers go at once
    for i in range(appends):
        flops.append_ledger(path, {"kind": "train", "name": writer, "flops": i + 1, "i": i})


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
    records = flops.read_ledger(path)  # every line parses as a record
    assert len(records) == 2 * APPENDS
    for name in ("a", "b"):  # each writer's records are all there, in its own order
        assert [r["i"] for r in records if r["name"] == name] == list(range(APPENDS))
    assert flops.ledger_total(path) == 2 * APPENDS * (APPENDS + 1) // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl", "ledger.jsonl.lock"]


def test_append_after_a_hand_written_line_without_newline(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"kind": "manual", "name": "cloud run", "flops": 5}')  # no final newline
    flops.append_ledger(path, {"kind": "train", "name": "runs/a", "flops": 7})
    lines = path.read_text().splitlines()
    assert lines[0] == '{"kind": "manual", "name": "cloud run", "flops": 5}'
    assert json.loads(lines[1])["flops"] == 7 and len(lines) == 2
    assert flops.ledger_total(path) == 12
