"""Workdir paths and files through one abstraction, `etils.epath.Path`: a local directory and a
`gs://` URL are read and written the same way, as Orbax does.

Helpers: `workdir_path` (a workdir as an epath.Path), `write_text_atomic`, `read_json`,
`json_text` (the one JSON writer: NaN and infinities become null),
`LineFile` (a JSON-lines log that object stores can hold), `upload_tree` (a local directory
copied to a workdir path), plus the start-up write check and the resolved config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from finetune_jax.json_values import json_text  # noqa: F401  (workdir_files.json_text)

# URL schemes a workdir may have. epath also reads s3:// and az://, but Orbax writes checkpoint
# arrays (through TensorStore) only to local paths and gs://.
URL_SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
URL_PACKAGES_HINT = (
    "for gs:// workdirs: pip install gcsfs google-cloud-storage (the `gcs` extra; "
    "tools/launch_tpu.py --setup installs them)"
)


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object-store location (`gs://...`) rather than a local one."""
    return _URL.match(os.fspath(path)) is not None


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """`workdir` as an epath.Path: a URL keeps its scheme, a local path is made absolute.

    Orbax needs an absolute local path; `os.path.abspath` on a URL would turn
    `gs://bucket/run` into `<cwd>/gs:/bucket/run`, hence the split.
    """
    text = os.fspath(workdir)
    match = _URL.match(text)
    if match is None:
        return epath.Path(os.path.abspath(text))
    if match.group(1) not in URL_SCHEMES:
        raise ValueError(
            f"workdir {text!r}: unsupported scheme {match.group(1)}://; use a local path or "
            + ", ".join(f"{s}://" for s in URL_SCHEMES)
        )
    return epath.Path(text)


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a part.

    Local files go through a temporary sibling and a rename. An object store's upload is
    already all-or-nothing, and its "rename" is a copy, so URLs are written in place.
    """
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def read_json(path: epath.Path) -> Any:
    """The JSON value in `path`, or None when there is no such file."""
    return json.loads(path.read_text()) if path.exists() else None


class LineFile:
    """A log of text lines (JSON lines) in a workdir, appended as a run goes.

    A local file is appended to and flushed at each line. Object stores cannot
    append, so for a URL the lines are kept here and the whole object is uploaded by `sync`,
    at most every `sync_every_s` seconds from `append` (an upload per line would slow the
    step loop); callers `sync` at the points they need it durable (a checkpoint, the end).
    """

    def __init__(self, path: epath.Path, sync_every_s: float = 30.0):
        self.path, self.sync_every_s = path, sync_every_s
        self._url = is_url(path)
        self._lines: list[str] = []
        self._local = None
        self._synced_at, self._dirty = time.monotonic(), False

    def read(self) -> list[str]:
        """The file's lines as it is now (the last one may lack its newline: a crash); []
        when it does not exist. Split on "\n" only, as the file was written."""
        if not self.path.exists():
            return []
        *lines, last = self.path.read_text().split("\n")
        return [line + "\n" for line in lines] + ([last] if last else [])

    def start(self, lines: list[str]) -> None:
        """Begin the log with `lines` (what to keep of an earlier run's), rewriting if they
        differ from what is there."""
        if self.read() != lines:
            write_text_atomic(self.path, "".join(lines))
        if self._url:
            self._lines = list(lines)
        else:
            self._local = self.path.open("a")

    def append(self, line: str) -> bool:
        """Add `line` (newline-terminated); True when this uploaded the log (URL only)."""
        if self._local is not None:
            self._local.write(line)
            self._local.flush()
            return False
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._synced_at < self.sync_every_s:
            return False
        self.sync()
        return True

    def sync(self) -> None:
        """Make every appended line durable in the workdir (a no-op for a local file)."""
        if self._url and self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty = False
        self._synced_at = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self._local is not None:
            self._local.close()
            self._local = None


def upload_tree(local_dir: str | os.PathLike, dest: epath.Path, last: tuple[str, ...] = ()) -> None:
    """Copy the files under `local_dir` to `dest` (a URL or local epath.Path), overwriting.

    Files named in `last` (paths relative to `local_dir`) are copied after all others, so an
    interrupted copy lacks them (e.g. an HF export without its config.json does not load).
    """
    files = []
    for root, _, names in os.walk(local_dir):
        files += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
    files.sort(key=lambda rel: (rel in last, rel))
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(local_dir, rel), "rb") as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)


def ensure_writable(workdir: str | os.PathLike) -> None:
    """Fail at start, not at the first checkpoint, when the workdir cannot be written."""
    path = workdir_path(workdir)
    # One probe file per process: several processes may share the workdir.
    probe = path / f".write-test-{os.uname().nodename}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except ImportError as e:  # fsspec's "install gcsfs" for a gs:// workdir
        raise ImportError(
            f"workdir {os.fspath(workdir)!r} needs a package that is not installed ({e}); "
            + URL_PACKAGES_HINT
        ) from e
    except Exception as e:  # noqa: BLE001 (object-store clients raise their own error types)
        raise PermissionError(
            f"workdir {os.fspath(workdir)!r} is not a writable directory "
            f"({getattr(e, 'strerror', None) or e}); pass "
            "--workdir=<a directory or gs:// URL this user can create and write>"
        ) from None


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
    """Write the resolved config as JSON into the workdir (the record of what ran)."""
    path = workdir_path(workdir) / "config.json"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json_text(config.to_dict(), indent=2, sort_keys=True, default=str)
        write_text_atomic(path, text)
    return os.fspath(path)


LABEL_NAMES_FILE = "label_names.json"


def read_label_names(workdir: str | os.PathLike | None) -> tuple[str, ...] | None:
    """The class names a run in `workdir` trained with (None: no workdir, or none saved)."""
    if not workdir:
        return None
    names = read_json(workdir_path(workdir) / LABEL_NAMES_FILE)
    return None if names is None else tuple(names)


def write_label_names(workdir: str | os.PathLike, names: tuple[str, ...]) -> str:
    """Save a classifier's class names (index = id) for eval, export and predict to read."""
    path = workdir_path(workdir) / LABEL_NAMES_FILE
    if jax.process_index() == 0:
        write_text_atomic(path, json_text(list(names), indent=2))
    return os.fspath(path)
