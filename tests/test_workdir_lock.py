"""The workdir lock: one training run per workdir, naming its holder; a lock whose holder is
gone (killed on this host, silent on another) is taken over; only a run's own lock is
released. Trainers racing for it, and whole jobs, are in tests/faults and tests/multidevice."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from finetune_jax.training import workdir_lock
from finetune_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock


def write_lock(workdir, **fields):
    """A lock file as another run would have written it."""
    now = time.time()
    values = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "alive": now,
        "token": "theirs",
        **fields,
    }
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(values))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_naming_host_pid_and_start(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    with pytest.raises(WorkdirBusyError) as refused:
        WorkdirLock(tmp_path).acquire()  # same host, even the same (live) process
    message = str(refused.value)
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(first.holder.started))
    for part in (f"host {socket.gethostname()}", f"pid {os.getpid()}", f"started {started}"):
        assert part in message
    assert f"delete {tmp_path / workdir_lock.LOCK_FILE}" in message
    first.release()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    with WorkdirLock(tmp_path):  # free again
        pass


def test_the_lock_of_a_killed_run_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with WorkdirLock(tmp_path) as lock:
        assert workdir_lock.read_holder(tmp_path).token == lock.holder.token
    err = capsys.readouterr().err
    assert f"took over {tmp_path / workdir_lock.LOCK_FILE}" in err
    assert f"pid {pid}" in err and f"no process {pid} runs on this host" in err


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    # The pid runs (it is this process) but started at another time: another program.
    write_lock(tmp_path, pid_start=1)
    with WorkdirLock(tmp_path) as lock:
        assert workdir_lock.read_holder(tmp_path).token == lock.holder.token


def test_another_hosts_lock_blocks_while_its_heartbeat_is_fresh(tmp_path):
    write_lock(tmp_path, host="other-host", pid=1, alive=time.time() - 60)
    with pytest.raises(WorkdirBusyError, match=r"host other-host, pid 1.* alive 60 s ago"):
        WorkdirLock(tmp_path, stale_after_s=600).acquire()
    write_lock(tmp_path, host="other-host", pid=1, alive=time.time() - 601)
    with WorkdirLock(tmp_path, stale_after_s=600) as lock:
        assert workdir_lock.read_holder(tmp_path).token == lock.holder.token


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_s=0.05) as lock:
        first = workdir_lock.read_holder(tmp_path).alive
        deadline = time.time() + 30
        while workdir_lock.read_holder(tmp_path).alive == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)
        assert workdir_lock.read_holder(tmp_path).token == lock.holder.token


def test_release_leaves_a_lock_that_is_no_longer_this_runs(tmp_path):
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    successor = dataclasses.replace(lock.holder, token="successor")
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(successor)))
    lock.release()
    assert workdir_lock.read_holder(tmp_path).token == "successor"


def test_of_runs_starting_together_exactly_one_gets_the_lock(tmp_path):
    start, won, refused = threading.Barrier(8), [], []

    def contend():
        lock = WorkdirLock(tmp_path)
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except WorkdirBusyError:
            refused.append(lock)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7
    assert workdir_lock.read_holder(tmp_path).token == won[0].holder.token
    won[0].release()


def test_of_runs_taking_over_a_stale_lock_together_exactly_one_gets_it(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    start, won = threading.Barrier(6), []

    def contend():
        lock = WorkdirLock(tmp_path)
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except WorkdirBusyError:
            pass

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert workdir_lock.read_holder(tmp_path).token == won[0].holder.token
    won[0].release()


def test_a_file_that_is_not_a_lock_is_refused_not_deleted(tmp_path):
    (tmp_path / workdir_lock.LOCK_FILE).write_text("my notes")
    an_hour_ago = time.time() - 3600  # not a lock being written right now
    os.utime(tmp_path / workdir_lock.LOCK_FILE, (an_hour_ago, an_hour_ago))
    with pytest.raises(WorkdirBusyError, match="not a lock this program wrote; delete it"):
        WorkdirLock(tmp_path).acquire()
    assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == "my notes"


def test_without_hard_links_the_lock_is_an_exclusive_create(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)  # as on some FUSE mounts
    with WorkdirLock(tmp_path) as lock:
        assert workdir_lock.read_holder(tmp_path).token == lock.holder.token
        with pytest.raises(WorkdirBusyError, match="in use by another training run"):
            WorkdirLock(tmp_path).acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left


def test_hold_is_the_lock_of_a_one_process_job(tmp_path):
    with workdir_lock.hold(tmp_path) as lock:
        assert workdir_lock.read_holder(tmp_path).token == lock.holder.token
        with pytest.raises(WorkdirBusyError, match="in use by another training run"):
            with workdir_lock.hold(tmp_path):
                pass
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
