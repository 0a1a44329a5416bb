"""One training run per workdir: `<workdir>/train.lock` names the run that holds it.

Two trainers writing one workdir mix their checkpoints, configs and metric logs, so `train`
takes this lock before it reads or writes anything of the workdir, and a second trainer is
refused in one line naming the holder (host, pid, start time). Of a multi-process job only
process 0 takes it, and every process learns the outcome from process 0 (`hold`): a second
job is refused as a whole, and writes nothing. `eval`, `export` and `predict` never take it:
they read finished checkpoints only (Orbax renames a step into place when it is complete).

A lock whose holder is gone does not block forever. On the holder's own host it is stale
when its pid is not running (or is another program: the pid's start time differs); from
another host, when its heartbeat (refreshed every `HEARTBEAT_S` by the holder) is older than
`STALE_AFTER_S`. A stale lock is taken over, with a note. The refusal says how to clear a
lock by hand.

A local lock is created atomically (a hard link of a complete file, which fails if the lock
exists, also over NFS; an exclusive create where there are no hard links). Object stores (`gs://`) have no such operation here: there the lock is
written, then read back to confirm it is this run's, which catches all but near-simultaneous
starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

from finetune_jax.training import workdir_files

LOCK_FILE = "train.lock"
HEARTBEAT_S = 60.0  # how often a holder refreshes its lock's `alive` time
STALE_AFTER_S = 600.0  # a lock of another host not refreshed for this long is left by a dead run
TAKEOVER_S = 60.0  # a turn to remove a stale lock takes milliseconds; older, its taker died
WRITING_S = 2.0  # an unreadable lock younger than this may still be being written


class WorkdirBusyError(RuntimeError):
    """Another training run holds the workdir's lock."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lock file says about the run that holds it."""

    host: str
    pid: int
    started: float  # epoch seconds when the run took the lock
    alive: float  # epoch seconds of its latest heartbeat
    token: str  # unique per acquisition: tells this run's lock from a successor's
    pid_start: int | None = None  # the pid's start time (clock ticks since boot; Linux)
    processes: int = 1  # processes of the holder's job

    def describe(self) -> str:
        """'host h, pid 12 (process 0 of 2), started 2026-12-06 21:01:03 UTC+0100'."""
        job = f" (process 0 of {self.processes})" if self.processes > 1 else ""
        return f"host {self.host}, pid {self.pid}{job}, started {_clock(self.started)}"


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC%z", time.localtime(seconds))


def lock_path(workdir: str | os.PathLike) -> epath.Path:
    return workdir_files.workdir_path(workdir) / LOCK_FILE


def read_holder(workdir: str | os.PathLike) -> Holder | None:
    """The lock's holder as the file says, or None when there is no lock (or an unreadable
    one: a lock is written whole, so only a foreign file can be unreadable)."""
    try:
        values = json.loads(lock_path(workdir).read_text())
        return Holder(**values)
    except (OSError, ValueError, TypeError):
        return None


def _pid_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a local process; None if none (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def stale_reason(holder: Holder, now: float | None = None, stale_after_s: float = STALE_AFTER_S):
    """Why `holder` is gone (its lock may be taken over), or None while it may be running."""
    if holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return f"no process {holder.pid} runs on this host"
        except PermissionError:  # another user's process: it exists
            pass
        state = _pid_state(holder.pid)
        if state is not None and state[0] in "ZX":
            return f"process {holder.pid} has exited"
        if state is not None and holder.pid_start is not None and state[1] != holder.pid_start:
            return f"pid {holder.pid} is now another program"
        return None
    silent = (time.time() if now is None else now) - holder.alive
    if silent > stale_after_s:
        return f"its heartbeat stopped {silent / 60:.0f} min ago"
    return None


def busy_message(workdir: str | os.PathLike, holder: Holder, stale_after_s: float) -> str:
    path = lock_path(workdir)
    ago = max(time.time() - holder.alive, 0.0)
    return (
        f"workdir {os.fspath(workdir)} is in use by another training run ({holder.describe()}, "
        f"alive {ago:.0f} s ago): two runs would mix their checkpoints and logs. Wait for it "
        "to finish, stop it, or pass another --workdir. If that run no longer exists (killed on "
        f"another host), delete {path}; a lock not refreshed for {stale_after_s / 60:.0f} min "
        "is taken over by itself"
    )


class WorkdirLock:
    """The lock of one workdir: `acquire` (refused with WorkdirBusyError while another live
    run holds it), a heartbeat thread while held, `release`."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        processes: int = 1,
    ):
        self.workdir, self.path = workdir, lock_path(workdir)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        state = _pid_state(os.getpid())
        now = time.time()
        self.holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            alive=now,
            token=uuid.uuid4().hex,
            pid_start=None if state is None else state[1],
            processes=processes,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (with a note); WorkdirBusyError if a live
        run holds it."""
        for attempt in range(250):  # a lock released, taken over or being written: look again
            if attempt:
                time.sleep(0.02)
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
            holder = read_holder(self.workdir)
            if holder is None:
                if _age(self.path) > WRITING_S:  # not ours to judge: refuse, not delete
                    raise WorkdirBusyError(
                        f"{self.path} exists but is not a lock this program wrote; delete it "
                        "if no training run uses this workdir"
                    )
                continue
            reason = stale_reason(holder, stale_after_s=self.stale_after_s)
            if reason is None:
                raise WorkdirBusyError(busy_message(self.workdir, holder, self.stale_after_s))
            if self._remove_stale(holder):
                print(
                    f"note: took over {self.path} from a run that is gone ({holder.describe()}: "
                    f"{reason})",
                    file=sys.stderr,
                    flush=True,
                )
        raise WorkdirBusyError(
            f"could not take {self.path}: other runs take and release it at the same time; "
            "start one training run per workdir"
        )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = read_holder(self.workdir)
        if held is not None and held.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _text(self) -> str:
        return json.dumps(dataclasses.asdict(self.holder))

    def _create(self) -> bool:
        """Write the lock if none exists; whether this run now holds it."""
        if workdir_files.is_url(self.path):
            if self.path.exists():
                return False
            self.path.write_text(self._text())
            time.sleep(0.5)  # a racing writer's object would be visible by now
            held = read_holder(self.workdir)
            return held is not None and held.token == self.holder.token
        return _create_new(self.path, self._text(), self.holder.token)

    def _remove_stale(self, stale: Holder) -> bool:
        """Remove the lock of `stale`, and only that one; whether it was removed.

        Runs finding the same stale lock take turns through a second file: the one whose
        turn it is removes the lock only if it still is `stale`'s, so a lock that a faster
        run has written meanwhile stays (nothing else replaces or removes an existing lock).
        """
        if workdir_files.is_url(self.path):
            self.path.unlink(missing_ok=True)
            return True
        turn = self.path.with_name(f"{LOCK_FILE}.takeover")
        if not _create_new(turn, self.holder.token, self.holder.token):
            with contextlib.suppress(OSError):  # a taker killed within its turn
                if time.time() - os.stat(turn).st_mtime > TAKEOVER_S:
                    turn.unlink()
            return False
        try:
            current = read_holder(self.workdir)
            if current is None or current.token != stale.token:
                return False
            self.path.unlink()
            return True
        finally:
            turn.unlink()

    def _beat(self) -> None:
        """Refresh `alive` every heartbeat_s while the lock is still this run's."""
        while not self._stop.wait(self.heartbeat_s):
            held = read_holder(self.workdir)
            if held is None or held.token != self.holder.token:
                print(
                    f"warning: {self.path} is no longer this run's lock (deleted by hand, or "
                    "taken over as stale); another trainer may now write this workdir",
                    file=sys.stderr,
                    flush=True,
                )
                return
            self.holder = dataclasses.replace(self.holder, alive=time.time())
            with contextlib.suppress(OSError):  # a transient error: the next beat retries
                workdir_files.write_text_atomic(self.path, self._text())


def _age(path: epath.Path) -> float:
    """Seconds since `path` was last written; -1 when there is no such file."""
    try:
        return time.time() - path.stat().mtime
    except (OSError, ValueError):  # ValueError: no such object (some epath backends)
        return -1.0


def _create_new(path: epath.Path, text: str, token: str) -> bool:
    """Create local file `path` holding `text` unless it exists; whether this call did.

    A complete file is hard-linked into place: the link fails if `path` exists (also over
    NFS), and no reader ever sees a half-written file. Where hard links are not supported,
    an exclusive create: a reader may then briefly find the file empty (`acquire` waits).
    """
    tmp = path.with_name(f"{path.name}.{token}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE mounts): an exclusive create instead
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, **options: Any) -> Iterator[WorkdirLock | None]:
    """Hold `workdir`'s lock for a training job: process 0 takes it, every process raises
    the same WorkdirBusyError if it cannot (no process goes on to write), and process 0
    releases it at the end. Yields the lock on process 0, None elsewhere."""
    import jax  # noqa: PLC0415

    count = jax.process_count()
    lock, refusal, error = None, "", None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, processes=count, **options)
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 (every process must hear of it, then it is raised)
            lock, error, refusal = None, e, str(e) or type(e).__name__
    if count > 1:
        refusal = _from_process_0(refusal)
    if error is not None:
        raise error
    if refusal:
        raise WorkdirBusyError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _from_process_0(text: str, size: int = 4096) -> str:
    """Process 0's `text` on every process (a collective: every process must call it)."""
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    data = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    data[: len(raw)] = np.frombuffer(raw, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(shared.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
