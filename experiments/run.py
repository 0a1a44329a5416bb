"""Run a sweep's runs one after another, or print one launcher command per run.

  python -m experiments.run experiments/peft_glue [--quick] [--only='sst2/lora/*'] [--dry-run]
  python -m experiments.run experiments/peft_glue --print-launch=slurm -- --nodes=1 --gpus_per_node=1

Finished runs (summary.json at max_steps, or stopped early) are skipped and partial ones
resume from their checkpoints, so an interrupted sweep continues where it stopped. A failing
run is recorded (`error.txt` in its workdir, a line in `<runs>/<sweep>/sweep.jsonl`) and the
sweep goes on; the exit status is 1 if any run failed. Runs execute in this process by
default (no interpreter start, weight load or import per run); `--isolate` starts each in its
own `python -m finetune_jax.train`. Either way JAX's persistent compilation cache lets runs
that differ only in their seed reuse compiled steps. It may be started from any directory:
it changes into the repo root, where the configs' relative data paths point.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments import sweep as sweep_lib
from finetune_jax.cluster import compilation_cache
from finetune_jax.training import workdir_files

LAUNCHERS = {
    "local": [],  # the plain train command
    "tpu": ["python", "tools/launch_tpu.py"],
    "slurm": ["python", "tools/launch_slurm.py"],
}
DEFAULT_CACHE = sweep_lib.RUNS_ROOT / ".jax_cache"


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content (a local path or an epath.Path, e.g. in a gs:// workdir), or
    None when it does not exist or is cut short."""
    try:
        return json.loads(workdir_files.workdir_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(summary: dict[str, Any] | None, config) -> bool:
    """Whether a run's summary is a finished run of `config`: it reached max_steps or
    stopped early, and holds its final eval when the config asks for one (a run stopped
    by a signal writes a summary too, but is not finished)."""
    if summary is None:
        return False
    done = (
        summary.get("final_step", 0) >= config.train.max_steps
        or summary.get("stopped_by") == "early stopping"
    )
    return done and (not config.train.get("final_split") or "final" in summary)


def run_status(workdir: str | Path, config) -> str:
    """The run's state: finished (see `is_finished`), partial (started, resumable) or new."""
    path = workdir_files.workdir_path(workdir)
    if is_finished(read_json(path / "summary.json"), config):
        return "finished"
    return "partial" if (path / "config.json").exists() else "new"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def config_conflicts(workdir: str | Path, config) -> list[str]:
    """Keys whose value in the workdir's config.json differs from `config` (resuming a
    run under another config would mix two experiments). Keys only one side has are
    ignored, so a newly added config key with its default does not orphan old runs."""
    old = read_json(workdir_files.workdir_path(workdir) / "config.json")
    if old is None:
        return []
    new = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    old_flat, new_flat = _flatten(old), _flatten(new)
    return sorted(k for k in old_flat.keys() & new_flat.keys() if old_flat[k] != new_flat[k])


def enable_compilation_cache(cache_dir: str | Path) -> None:
    """Persist compiled executables in `cache_dir`, small ones too (checked on CPU)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _quiet() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()


def train_in_process(run: sweep_lib.Run, config, log_path: Path) -> dict[str, Any]:
    """`finetune_jax.train.train` here, its printed output going to `log_path`.

    Afterwards JAX's in-memory caches are dropped, so a long sweep does not accumulate every
    run's executables (the next run's steps are new functions anyway; the persistent cache
    still serves them).
    """
    import jax

    from finetune_jax import train as train_lib

    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log):
            with contextlib.redirect_stderr(log):
                return train_lib.train(config, run.workdir)
    finally:
        jax.clear_caches()
        gc.collect()


def train_subprocess(
    run: sweep_lib.Run, config, log_path: Path, cache_dir: str | None
) -> dict[str, Any]:
    """`python -m finetune_jax.train` for the run, output to `log_path`; its summary."""
    env = dict(os.environ)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    args = [sys.executable, "-m", "finetune_jax.train", *sweep_lib.train_args(run)]
    with open(log_path, "a") as log:
        code = subprocess.run(
            args, cwd=sweep_lib.REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        ).returncode
    if code:
        raise RuntimeError(f"{shlex.join(args[1:4])} ... exited with status {code}")
    return read_json(workdir_files.workdir_path(run.workdir) / "summary.json")


def _record(sweep_dir: Path, entry: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    entry = {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(), **entry}
    with open(sweep_dir / "sweep.jsonl", "a") as f:
        f.write(workdir_files.json_text(entry) + "\n")


def execute(
    runs: Sequence[sweep_lib.Run],
    configs: Sequence[Any],
    train_fn: Callable[[sweep_lib.Run, Any, Path], dict[str, Any]],
    sweep_dir: Path,
    say: Callable[[str], None] = print,
    prune_checkpoints: bool = False,
) -> list[str]:
    """Train every unfinished run in order with `train_fn(run, config, log_path)`; the names
    of the runs that failed (each one's traceback is in `<workdir>/error.txt`).

    `prune_checkpoints` deletes a run's checkpoints once it has finished (its summary holds
    the results; a finished run is never resumed), to bound disk use over a long sweep.
    """
    failed = []
    for k, (run, config) in enumerate(zip(runs, configs), 1):
        head = f"[{k}/{len(runs)}] {run.name}"
        workdir = Path(run.workdir)
        # Checked before skipping: a finished run of an edited sweep is stale, not done.
        conflicts = config_conflicts(workdir, config)
        status = run_status(workdir, config)
        if status == "finished" and not conflicts:
            say(f"{head}: finished, skipped")
            continue
        t0 = time.perf_counter()
        try:
            if conflicts:
                raise ValueError(
                    f"{workdir} holds a run with other values for {', '.join(conflicts)}; "
                    "delete that workdir or restore the sweep definition"
                )
            say(f"{head}: {'resuming' if status == 'partial' else 'starting'}")
            workdir.mkdir(parents=True, exist_ok=True)
            summary = train_fn(run, config, workdir / "train.log")
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep
            elapsed = time.perf_counter() - t0
            failed.append(run.name)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "error.txt").write_text(traceback.format_exc())
            _record(sweep_dir, {"run": run.name, "status": "failed", "elapsed_s": elapsed})
            say(f"{head}: FAILED after {elapsed:.0f}s: {type(e).__name__}: {e}")
            continue
        elapsed = time.perf_counter() - t0
        stopped_by = (summary or {}).get("stopped_by")
        if stopped_by not in (None, "early stopping"):  # SIGINT / SIGTERM: stop the sweep
            _record(sweep_dir, {"run": run.name, "status": "interrupted", "elapsed_s": elapsed})
            say(f"{head}: stopped by {stopped_by}, checkpoint saved")
            raise KeyboardInterrupt(stopped_by)
        (workdir / "error.txt").unlink(missing_ok=True)
        if prune_checkpoints and run_status(workdir, config) == "finished":
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        _record(sweep_dir, {"run": run.name, "status": "done", "elapsed_s": elapsed})
        say(f"{head}: done in {elapsed:.0f}s{_result_text(summary)}")
    return failed


def _result_text(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("best") is None:
        return ""
    text = f", best {summary['metric']} {summary['best']:.4f} at step {summary['best_step']}"
    final = summary.get("final") or {}
    if summary["metric"] in final:
        text += f", {final.get('split', 'final')} {final[summary['metric']]:.4f}"
    return text


def launch_command(run: sweep_lib.Run, launcher: str, launcher_args: Sequence[str]) -> str:
    """One shell line that starts the run with `launcher` (local, tpu or slurm)."""
    if launcher == "local":
        return sweep_lib.train_command(run)
    own = list(launcher_args)
    if launcher == "slurm" and not any(a.startswith("--job_name") for a in own):
        job = f"{run.sweep}.{run.name}".replace("/", ".").replace("=", "").replace(",", ".")
        own.insert(0, f"--job_name={job}")
    return shlex.join([*LAUNCHERS[launcher], *own, "--", *sweep_lib.train_args(run)])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The runner's flags; anything after `--` goes to the launcher of --print-launch."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep", help="sweep file, study dir or name (e.g. experiments/peft_glue)")
    parser.add_argument("--quick", action="store_true", help="the sweep's quick (CPU) variant")
    parser.add_argument("--only", default="*", help="glob over run names, e.g. 'sst2/lora/*'")
    parser.add_argument(
        "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="list, run nothing"
    )
    parser.add_argument(
        "--print-launch",
        "--print_launch",
        dest="print_launch",
        nargs="?",
        const="local",
        choices=sorted(LAUNCHERS),
        help="print one launcher command per unfinished run instead of running "
        "(tpu/slurm: pass the launcher's own flags after `--`)",
    )
    parser.add_argument(
        "--runs-root",
        "--runs_root",
        dest="runs_root",
        default=str(sweep_lib.RUNS_ROOT),
        help="where workdirs go: <runs-root>/<sweep>/<run> (default experiments/runs)",
    )
    parser.add_argument(
        "--prune-checkpoints",
        "--prune_checkpoints",
        dest="prune_checkpoints",
        action="store_true",
        help="delete each run's checkpoints once it has finished (results stay)",
    )
    parser.add_argument(
        "--isolate", action="store_true", help="a fresh `python -m finetune_jax.train` per run"
    )
    parser.add_argument(
        "--compile-cache",
        "--compile_cache",
        dest="compile_cache",
        default=str(DEFAULT_CACHE),
        help="JAX persistent compilation cache dir ('' disables)",
    )
    own, launcher_args = argv, []
    if "--" in argv:
        i = list(argv).index("--")
        own, launcher_args = argv[:i], argv[i + 1 :]
    args = parser.parse_args(own)
    args.launcher_args = launcher_args
    if launcher_args and not args.print_launch:
        parser.error(f"arguments after `--` are for --print-launch only: {launcher_args}")
    return args


def load_runs(args: argparse.Namespace) -> tuple[sweep_lib.Sweep, Path, list, list]:
    """The sweep, its runs dir, its runs matching --only, and their configs (a bad override
    fails here, before any training)."""
    sweep = sweep_lib.load(args.sweep, quick=args.quick)
    runs_root = workdir_files.workdir_path(args.runs_root)
    runs = [r for r in sweep_lib.expand(sweep, runs_root) if fnmatch.fnmatchcase(r.name, args.only)]
    if not runs:
        raise ValueError(f"no run of sweep {sweep.name} matches --only={args.only!r}")
    os.chdir(sweep_lib.REPO)  # configs name their data relative to the repo root
    return sweep, runs_root / sweep.name, runs, [sweep_lib.build_config(r) for r in runs]


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    compilation_cache.enable()  # each run after the first of a shape loads its steps from disk
    try:
        sweep, sweep_dir, runs, configs = load_runs(args)
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2
    if workdir_files.is_url(sweep_dir) and not (args.print_launch or args.dry_run):
        # This runner appends train.log and sweep.jsonl beside the workdirs, which an object
        # store cannot do; launched jobs write their gs:// workdirs themselves.
        print(
            f"error: --runs-root={args.runs_root} is a URL: use it with --print-launch "
            "(or --dry-run), or run the sweep with a local --runs-root",
            file=sys.stderr,
        )
        return 2
    if args.print_launch or args.dry_run:
        for run, config in zip(runs, configs):
            status = run_status(run.workdir, config)
            if args.print_launch:
                if status == "finished":
                    print(f"# finished, skipped: {run.name}", file=sys.stderr)
                else:
                    print(launch_command(run, args.print_launch, args.launcher_args))
            else:
                print(f"{status:9s} {run.name}\n          {sweep_lib.train_command(run)}")
        return 0
    print(f"sweep {sweep.name}: {len(runs)} runs ({sweep.path})", flush=True)
    command = ["python", "-m", "experiments.run", *argv]
    mode = "isolated" if args.isolate else "in-process"
    _record(sweep_dir, {"event": "start", "command": command, "mode": mode})
    cache = args.compile_cache or None
    if args.isolate:
        train_fn = lambda run, config, log: train_subprocess(run, config, log, cache)
    else:
        if cache:
            enable_compilation_cache(cache)
        _quiet()
        train_fn = train_in_process
    t0 = time.perf_counter()
    try:
        failed = execute(
            runs,
            configs,
            train_fn,
            sweep_dir,
            say=lambda s: print(s, flush=True),
            prune_checkpoints=args.prune_checkpoints,
        )
    except KeyboardInterrupt:
        _record(sweep_dir, {"event": "interrupted", "wall_s": time.perf_counter() - t0})
        print(f"sweep {sweep.name} interrupted; rerun the same command to continue")
        return 130
    wall = time.perf_counter() - t0
    _record(sweep_dir, {"event": "end", "wall_s": wall, "failed": failed})
    print(f"sweep {sweep.name}: {len(runs) - len(failed)}/{len(runs)} runs done in {wall:.0f}s")
    if failed:
        print(f"{len(failed)} failed (see error.txt in each workdir):", *failed, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
