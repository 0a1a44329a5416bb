"""Workdirs through one path abstraction: a `gs://` workdir keeps its scheme end to end (train,
resume, eval, export, sweeps' launch commands and reports) against a fake bucket, and a local
relative workdir works as before.

The fake bucket is fsspec's `gs`/`gcs` protocol (what epath uses for gs:// without
TensorFlow) mapped onto a local directory; it refuses appends, as object stores do. Orbax
writes array data with TensorStore's own GCS driver, which needs the network: the fixture
points that driver's kvstore spec (and Orbax's hierarchical-namespace probe, a GCS API call)
at the same directory, so checkpoints are real files under the fake bucket, written through
Orbax's GCS code paths (commit-file atomicity rather than renames).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils

from experiments import report, run, sweep
from finetune_jax.eval import run_eval
from finetune_jax.export import export
from finetune_jax.train import train
from finetune_jax.training import builder, checkpoints, workdir_files
from tests.helpers import REPO, tiny_config
from tests.test_experiments import demo_sweep


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """`gs://<bucket>/<key>` is `<root>/<bucket>/<key>`; yields (root, TensorStore's paths)."""
    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")
        cachable = False  # a new root per test

        def __init__(self, *args, **kwargs):  # gcsfs's options (finalize_on_close) ignored
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        @classmethod
        def _strip_protocol(cls, path):
            return str(path).removeprefix("gs://").removeprefix("gcs://")

        def _open(self, path, mode="rb", *args, **kwargs):
            if "a" in mode:
                raise NotImplementedError("object stores cannot append")
            return super()._open(path, mode, *args, **kwargs)

    tensorstore_paths = []

    def local_kvstore(path):
        tensorstore_paths.append(str(path))
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(root / bucket / key)}

    for protocol in FakeGCS.protocol:  # the registry's own dict, so monkeypatch restores it
        monkeypatch.setitem(fsspec_registry, protocol, FakeGCS)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", local_kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    # epath caches one filesystem per protocol: drop the real (or an earlier test's) one.
    clear = epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear
    clear()
    yield root, tensorstore_paths
    clear()


def test_workdir_path_keeps_url_schemes_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = workdir_files.workdir_path("gs://bucket/runs/sst2")
    assert os.fspath(url / "checkpoints") == "gs://bucket/runs/sst2/checkpoints"
    assert workdir_files.is_url(url) and not workdir_files.is_url("runs/sst2")
    assert os.fspath(workdir_files.workdir_path("runs/sst2")) == str(tmp_path / "runs" / "sst2")
    with pytest.raises(ValueError, match=r"unsupported scheme ftp://"):
        workdir_files.workdir_path("ftp://host/run")


def test_line_file_on_a_url_rewrites_the_object_instead_of_appending(fake_gcs):
    root, _ = fake_gcs
    log = workdir_files.LineFile(epath.Path("gs://bucket/run/log.jsonl"), sync_every_s=3600)
    log.start(["1\n"])  # the fake refuses appends: this would fail if it appended
    assert (root / "bucket/run/log.jsonl").read_text() == "1\n"
    assert log.append("2\n") is False  # within sync_every_s: kept for the next sync
    assert (root / "bucket/run/log.jsonl").read_text() == "1\n"
    log.close()
    assert (root / "bucket/run/log.jsonl").read_text() == "1\n2\n"
    assert workdir_files.LineFile(epath.Path("gs://bucket/run/log.jsonl")).read() == ["1\n", "2\n"]


def _records(path):
    """metrics.jsonl's records without their timings."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in records]


def test_gs_workdir_trains_resumes_evaluates_and_exports_like_a_local_one(
    fake_gcs, tiny_bert_dir, sst2_slice, tmp_path, monkeypatch
):
    root, tensorstore_paths = fake_gcs
    cwd = tmp_path / "cwd"  # nothing but the local run may appear here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = tiny_config(tiny_bert_dir, sst2_slice)
    url, bucket = "gs://bucket/runs/sst2", root / "bucket" / "runs" / "sst2"

    train(config, "run")  # a local relative workdir, straight through
    train(config, url, until_step=3)  # the gs:// one stopped halfway, then resumed
    manager = checkpoints.make_manager(url, 2, None, read_only=True)
    assert os.fspath(manager.directory) == f"{url}/checkpoints" and manager.all_steps() == [3]
    summary = train(config, url)

    assert sorted(os.listdir(cwd)) == ["run"]  # no `gs:` directory made of the URL
    for name in ("config.json", "manifest.json", "metrics.jsonl", "summary.json"):
        assert (bucket / name).is_file(), name
    assert len(json.loads((bucket / "manifest.json").read_text())["starts"]) == 2
    assert any(p.name.startswith("events.out.tfevents") for p in (bucket / "tensorboard").iterdir())
    assert {p.name for p in (bucket / "checkpoints").iterdir()} == {"3", "6"}
    assert (bucket / "checkpoints" / "6" / "commit_success.txt").exists()  # GCS atomicity
    assert tensorstore_paths and all(p.startswith(f"{url}/checkpoints/") for p in tensorstore_paths)
    # The same records and the same final state as the local run (resume is exact).
    assert _records(bucket / "metrics.jsonl") == _records(cwd / "run" / "metrics.jsonl")
    exp = builder.build(config)
    states = []
    for workdir in ("run", url):
        manager = checkpoints.make_manager(workdir, 2, None, read_only=True)
        states.append(jax.device_get(checkpoints.restore_latest(manager, exp.abstract_state())[0]))
        checkpoints.close(manager)
    for a, b in zip(*map(jax.tree.leaves, states)):
        assert np.array_equal(a, b)

    result = run_eval(config, url, "validation", which=str(summary["best_step"]))
    assert json.loads((bucket / f"eval_validation_step{result['step']}.json").read_text()) == result

    out = export(config, url, "gs://bucket/exports/sst2")["out"]
    assert out == "gs://bucket/exports/sst2"
    exported = root / "bucket" / "exports" / "sst2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(exported))
    export(config, "run", "hf")  # the local export of the same checkpoint: the same weights
    assert (exported / "model.safetensors").read_bytes() == (
        cwd / "hf/model.safetensors"
    ).read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(config, url, "gs://bucket/exports/sst2")


def test_sweeps_launch_into_and_report_from_a_gs_runs_root(fake_gcs, capsys, monkeypatch):
    root, _ = fake_gcs
    runs = sweep.expand(demo_sweep(tasks={"sst2": {}}, seeds=(0,)), "gs://bucket/runs")
    first = runs[0]
    assert first.workdir == f"gs://bucket/runs/demo/{first.name}"
    assert f"--workdir={first.workdir}" in sweep.train_args(first)
    config = sweep.build_config(first)
    assert run.run_status(first.workdir, config) == "new"

    local = root / "bucket" / "runs" / "demo" / first.name
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps(config.to_dict(), default=str))
    summary = {"final_step": config.train.max_steps, "final": {"accuracy": 0.9}}
    (local / "summary.json").write_text(json.dumps(summary))
    (local / "metrics.jsonl").write_text('{"step": 10, "kind": "eval", "accuracy": 0.9}\n')
    assert run.run_status(first.workdir, config) == "finished"
    assert run.config_conflicts(first.workdir, config) == []
    (result,) = report.collect([first])
    assert result["finished"] and result["metrics"][0]["accuracy"] == 0.9

    # The in-process runner appends logs beside the workdirs: not on an object store.
    monkeypatch.chdir(REPO)  # main moves to the repo root; this restores the cwd afterwards
    assert run.main(["peft_glue", "--quick", "--runs-root=gs://bucket/runs"]) == 2
    assert "is a URL: use it with --print-launch" in capsys.readouterr().err
