"""Sweep definitions and their expansion into runs.

A sweep is a python file, `experiments/<study>/sweep.py` (or `experiments/<study>.py`), with

    def get_sweep(quick: bool = False) -> Sweep: ...

A `Sweep` names a config file (with a `{task}` slot), the tasks, the settings (each: fixed
config overrides and a grid of hyperparameters, or an explicit list of points) and the seeds.
`expand` turns it into one `Run` per task x setting x point x seed, each with a stable name
(`sst2/lora/lr=0.001/seed=0`) and its own workdir `experiments/runs/<sweep>/<name>/`.
`--quick` sweeps are named `<study>-quick` so their runs never share a workdir with the full
ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from finetune_jax import config as config_lib
from finetune_jax.training import workdir_files

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
RUNS_ROOT = EXPERIMENTS / "runs"
RESULTS_ROOT = EXPERIMENTS / "results"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of training (e.g. LoRA): fixed overrides plus the hyperparameters to tune.

    `grid` is either a mapping `{config key: values}` (all combinations, in key order) or an
    explicit sequence of points `[{config key: value, ...}, ...]`.
    """

    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )

    def points(self) -> list[dict[str, Any]]:
        """The grid's points, in a stable order."""
        if isinstance(self.grid, Mapping):
            keys = list(self.grid)
            return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]
        return [dict(point) for point in self.grid]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A study: `config` (e.g. "configs/glue/minilm.py:{task}", relative to the repo root)
    trained for every task x setting x grid point x seed.

    Overrides apply in this order, later winning: `overrides` (all runs), the task's,
    the setting's, the grid point's, then `seed`. `notes` says what a quick variant cuts;
    the report prints it in the table header.
    """

    config: str
    tasks: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Setting]
    seeds: Sequence[int]
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""
    name: str = ""  # set by `load`: the study's name, with "-quick" for the quick variant
    path: str = ""  # set by `load`: the sweep file
    quick: bool = False


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep."""

    sweep: str
    name: str
    task: str
    setting: str
    point: Mapping[str, Any]
    seed: int
    config: str  # "configs/glue/minilm.py:sst2"
    overrides: Mapping[str, Any]
    workdir: str
    source: str  # the sweep file, for error messages

    @property
    def point_name(self) -> str:
        return point_name(self.point)


def sweep_names() -> list[str]:
    """The sweeps found under experiments/: `<study>/sweep.py` and `<study>.py` files."""
    dirs = [p.parent.name for p in EXPERIMENTS.glob("*/sweep.py")]
    defines = re.compile(r"^def get_sweep\(", re.MULTILINE)
    files = [p.stem for p in EXPERIMENTS.glob("*.py") if defines.search(p.read_text())]
    return sorted(dirs + files)


def resolve(spec: str) -> Path:
    """The sweep file for `spec`: a file, a study directory, or a study name."""
    path = Path(spec)
    candidates = [path / "sweep.py", path] if path.suffix != ".py" else [path]
    name = spec.rstrip("/").removeprefix("experiments/").removeprefix("experiments.")
    candidates += [EXPERIMENTS / name / "sweep.py", EXPERIMENTS / f"{name}.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"unknown sweep {spec!r}: no sweep file at {', '.join(map(str, candidates[:2]))}; "
        f"sweeps here: {', '.join(sweep_names()) or 'none'}"
    )


def _import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str, quick: bool = False) -> Sweep:
    """Import a sweep file and return its `get_sweep(quick)`, named after the study."""
    path = resolve(spec)
    module = _import_file(path, f"_sweep_{path.parent.name}_{path.stem}")
    if not hasattr(module, "get_sweep"):
        raise AttributeError(f"sweep file {path} defines no get_sweep(quick=False)")
    sweep = module.get_sweep(quick=quick)
    if not isinstance(sweep, Sweep):
        raise TypeError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep")
    study = path.parent.name if path.name == "sweep.py" else path.stem
    name = f"{study}-quick" if quick else study
    return dataclasses.replace(sweep, name=name, path=str(path), quick=quick)


def format_value(value: Any) -> str:
    """A value as it appears in run names: floats compactly (1e-05, 0.0003), others as str."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(point: Mapping[str, Any]) -> str:
    """`lr=0.0003,llrd_decay=0.8`: each key's last component (whole key if ambiguous)."""
    leaves = [key.rsplit(".", 1)[-1] for key in point]
    return ",".join(
        f"{leaf if leaves.count(leaf) == 1 else key}={format_value(value)}"
        for key, leaf, value in zip(point, leaves, point.values())
    )


def expand(sweep: Sweep, runs_root: str | Path = RUNS_ROOT) -> list[Run]:
    """Every run of the sweep, in order task, setting, point, seed; names are unique."""
    if not sweep.name:
        raise ValueError("sweep has no name; load it with experiments.sweep.load")
    if not sweep.seeds:
        raise ValueError(f"sweep {sweep.path or sweep.name} lists no seeds")
    runs, seen = [], set()
    for task, task_overrides in sweep.tasks.items():
        for setting_name, setting in sweep.settings.items():
            for point in setting.points():
                for seed in sweep.seeds:
                    parts = [task, setting_name, point_name(point), f"seed={seed}"]
                    name = "/".join(p for p in parts if p)
                    if name in seen:
                        raise ValueError(f"sweep {sweep.path or sweep.name}: run {name} twice")
                    seen.add(name)
                    overrides = {
                        **sweep.overrides,
                        **task_overrides,
                        **setting.overrides,
                        **point,
                        "seed": seed,
                    }
                    runs.append(
                        Run(
                            sweep=sweep.name,
                            name=name,
                            task=task,
                            setting=setting_name,
                            point=point,
                            seed=seed,
                            config=sweep.config.format(task=task),
                            overrides=overrides,
                            workdir=_join(runs_root, sweep.name, name),
                            source=sweep.path or sweep.name,
                        )
                    )
    return runs


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` (path relative to the repo root) -> its get_config(arg)."""
    path, _, arg = spec.partition(":")
    full = Path(path) if Path(path).is_absolute() else REPO / path
    if not full.is_file():
        raise FileNotFoundError(f"config file {full} does not exist")
    module = _import_file(full, f"_config_{full.stem}")
    return module.get_config(arg) if arg else module.get_config()


def build_config(run: Run) -> ml_collections.ConfigDict:
    """The run's resolved config: its config file with the sweep's overrides applied."""
    return config_lib.apply_overrides(
        load_config_file(run.config), run.overrides, f"sweep {run.source}"
    )


def flag_value(value: Any) -> str:
    """A value as ml_collections' `--config.key=` flag parser reads it."""
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return repr(value) if isinstance(value, float) else str(value)


def _join(runs_root: str | Path, *parts: str) -> str:
    """A workdir under `runs_root`, a local path or a gs:// URL (which `Path` would mangle)."""
    if workdir_files.is_url(runs_root):
        return "/".join([str(runs_root).rstrip("/"), *parts])
    return str(Path(runs_root).joinpath(*parts))


def train_args(run: Run) -> list[str]:
    """`python -m finetune_jax.train` arguments for the run (paths relative to the repo)."""
    workdir = run.workdir
    if not workdir_files.is_url(workdir) and Path(workdir).is_absolute():
        if Path(workdir).is_relative_to(REPO):
            workdir = str(Path(workdir).relative_to(REPO))
    return [
        f"--config={run.config}",
        f"--workdir={workdir}",
        *(f"--config.{key}={flag_value(value)}" for key, value in run.overrides.items()),
    ]


def train_command(run: Run) -> str:
    """The shell command that trains (or resumes) the run from the repo root."""
    return shlex.join(["python", "-m", "finetune_jax.train", *train_args(run)])
