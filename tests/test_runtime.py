"""qwen_min.runtime's file helpers: atomic writes (umask, folder fsync, a full disk) and the
JSON-lines reader that skips a line cut short by a kill."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from qwen_min import runtime


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        runtime.atomic_write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == mode


def test_atomic_write_fsyncs_the_file_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    runtime.atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == ["file", "folder"]


class FullDisk:
    """A file object that writes half the bytes, then fails as a full disk does."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: bytes) -> int:
        os.write(self.fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(fd))
    with pytest.raises(OSError) as e:
        runtime.atomic_write_text(path, "new contents")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert runtime.os_error_line(e.value) == (
        f"{path}: No space left on device; free some disk space, then run the same command "
        "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert path.read_text() == "old"


def test_read_jsonl_skips_a_last_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    assert runtime.read_jsonl(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.4}]
    assert runtime.read_jsonl(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize("name, line", [
    ("foo", "--device foo: not a device name; use auto, cpu, cuda, cuda:N or mps"),
    ("cpu:x", "--device cpu:x: not a device name; use auto, cpu, cuda, cuda:N or mps"),
])
def test_an_unknown_device_is_one_line(name, line):
    with pytest.raises(SystemExit) as raised:
        runtime.pick_device(name)
    assert str(raised.value) == line


def test_a_known_device_is_returned():
    assert runtime.pick_device("cpu").type == "cpu"
