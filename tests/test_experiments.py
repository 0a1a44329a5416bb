"""Contracts of experiments/: sweep expansion, resume-skipping, run manifests, aggregation."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import report, run, sweep
from experiments.sweep import Setting, Sweep
from finetune_jax import tree_paths
from finetune_jax.config import base_config
from finetune_jax.training import manifest, optim
from tests.helpers import REPO, load_whisper


def demo_sweep(**changes) -> Sweep:
    fields = dict(
        config="configs/glue/minilm.py:{task}",
        tasks={"sst2": {"data.holdout_rows": 100}, "cola": {}},
        settings={
            "full": Setting({"optim.preset": "full"}, {"optim.lr": (1e-4, 3e-5)}),
            "lora": Setting(
                {"optim.preset": "lora", "peft.rank": 8},
                [{"optim.lr": 1e-3, "peft.rank": 4}],  # an explicit point beats the setting
            ),
        },
        seeds=(0, 1),
        overrides={"train.max_steps": 10, "data.holdout_rows": 50},
        name="demo",
        path="experiments/demo/sweep.py",
    )
    return Sweep(**{**fields, **changes})


def test_expand_names_overrides_seeds_and_workdirs(tmp_path):
    runs = sweep.expand(demo_sweep(), tmp_path)
    assert [r.name for r in runs[:6]] == [
        "sst2/full/lr=0.0001/seed=0",
        "sst2/full/lr=0.0001/seed=1",
        "sst2/full/lr=3e-05/seed=0",
        "sst2/full/lr=3e-05/seed=1",
        "sst2/lora/lr=0.001,rank=4/seed=0",
        "sst2/lora/lr=0.001,rank=4/seed=1",
    ]
    assert len(runs) == 2 * (2 + 1) * 2 and len({r.name for r in runs}) == len(runs)
    lora = runs[4]
    assert lora.config == "configs/glue/minilm.py:sst2"
    assert lora.workdir == str(tmp_path / "demo" / "sst2/lora/lr=0.001,rank=4/seed=0")
    # Order: sweep, task, setting, point, seed; later wins.
    assert lora.overrides == {
        "train.max_steps": 10,
        "data.holdout_rows": 100,
        "optim.preset": "lora",
        "peft.rank": 4,
        "optim.lr": 1e-3,
        "seed": 0,
    }
    assert runs[6].task == "cola" and runs[6].overrides["data.holdout_rows"] == 50
    config = sweep.build_config(lora)
    assert (config.peft.rank, config.optim.lr, config.seed, config.data.task) == (
        4,
        1e-3,
        0,
        "sst2",
    )


def test_duplicate_points_are_an_error(tmp_path):
    settings = {"full": Setting(grid=[{"optim.lr": 1e-4}, {"optim.lr": 1e-4}])}
    with pytest.raises(ValueError, match="sst2/full/lr=0.0001/seed=0 twice"):
        sweep.expand(demo_sweep(settings=settings), tmp_path)


def test_peft_glue_full_and_quick_variants():
    full, quick = sweep.load("experiments/peft_glue"), sweep.load("peft_glue", quick=True)
    assert (full.name, quick.name) == ("peft_glue", "peft_glue-quick")
    full_runs, quick_runs = sweep.expand(full), sweep.expand(quick)
    settings = {"full", "linear_probe", "bitfit", "top2", "llrd", "lora"}
    assert {r.setting for r in full_runs} == {r.setting for r in quick_runs} == settings
    assert {r.task for r in full_runs} == {"sst2", "rte", "mrpc", "cola", "stsb"}
    assert len(full_runs) == 5 * 6 * 3 * 3 and len(quick_runs) == 2 * 6 * 2 * 3
    assert {r.seed for r in quick_runs} == {0, 1, 2}
    assert all("/peft_glue-quick/" in r.workdir for r in quick_runs)
    assert quick.notes and "--quick" in quick.notes
    # Every run's overrides are valid keys of the schema, with the intended values.
    for r in quick_runs[:: 3 * 2]:
        config = sweep.build_config(r)
        assert config.train.max_steps <= 100 and config.data.eval_split == "holdout"
        assert config.train.final_split == "validation" and config.data.holdout_rows > 0
    lora = next(r for r in full_runs if r.setting == "lora" and r.task == "rte")
    config = sweep.build_config(lora)
    assert (config.optim.preset, config.peft.rank) == ("lora", 8)
    top2 = next(r for r in full_runs if r.setting == "top2")
    assert sweep.build_config(top2).optim.top_k == 2


def test_speech_commands_settings_are_data(tiny_whisper_dir):
    full, quick = sweep.load("speech_commands"), sweep.load("speech_commands", quick=True)
    settings = {"zero_shot", "lora", "full", "decoder_only"}
    for study in (full, quick):
        runs = sweep.expand(study)
        assert {r.setting for r in runs} == settings
        configs = {r.setting: sweep.build_config(r) for r in runs}
        assert configs["zero_shot"].train.max_steps == 0  # the pretrained model, evaluated
        assert all(c.train.final_split == "validation" for c in configs.values())
        assert all(c.data.eval_split == "holdout" for c in configs.values())
    # Decoder-only is a rule list, no special case: it freezes exactly the encoder.
    _, module, params = load_whisper(tiny_whisper_dir)
    decoder_only = next(r for r in sweep.expand(quick) if r.setting == "decoder_only")
    groups = optim.param_groups(sweep.build_config(decoder_only).optim, params)
    for path, trainable in zip(
        tree_paths.param_paths(params), jax.tree.leaves(groups.trainable), strict=True
    ):
        assert trainable == (not path.startswith("model/encoder/")), path


def test_unknown_override_key_names_the_key_and_the_sweep_file(tmp_path):
    bad = sweep.expand(demo_sweep(overrides={"optim.lrr": 1e-3}), tmp_path)[0]
    with pytest.raises(KeyError, match=r"optim\.lrr.*experiments/demo/sweep\.py"):
        sweep.build_config(bad)
    bad = sweep.expand(demo_sweep(overrides={"optimizer.lr": 1e-3}), tmp_path)[0]
    with pytest.raises(KeyError, match="'optimizer' is not a config section"):
        sweep.build_config(bad)


def test_unknown_sweep_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="unknown sweep 'nope'.*peft_glue"):
        sweep.load("nope")


def test_train_args_parse_back_to_the_same_config(tmp_path):
    """The printed launch command means the same config as the in-process run."""
    r = sweep.expand(sweep.load("peft_glue", quick=True), tmp_path)[-1]  # lora, tuple buckets
    args = sweep.train_args(r)
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=["prog", *args])
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(["prog", *args])
    assert holder.value.to_dict() == sweep.build_config(r).to_dict()
    assert values.workdir == r.workdir
    command = run.launch_command(r, "slurm", ["--nodes=1", "--gpus_per_node=1"])
    assert command.startswith("python tools/launch_slurm.py --job_name=peft_glue-quick.stsb.lora")
    assert " -- --config=configs/glue/minilm.py:stsb " in command


def finished_summary(max_steps, **extra):
    return {
        "final_step": max_steps,
        "stopped_by": None,
        "best": 0.5,
        "metric": "accuracy",
        "best_step": max_steps,
        "final": {"split": "validation", "accuracy": 0.5},
        **extra,
    }


def test_execute_skips_finished_resumes_partial_and_records_failures(tmp_path):
    base = demo_sweep(
        tasks={"sst2": {}},
        settings={"full": Setting(grid={"optim.lr": (1e-4,)})},
        seeds=(0, 1, 2, 3, 4),
        overrides={"train.max_steps": 10, "train.final_split": "validation"},
    )
    runs = sweep.expand(base, tmp_path)
    configs = [sweep.build_config(r) for r in runs]
    dirs = [Path(r.workdir) for r in runs]
    for d in dirs:
        d.mkdir(parents=True)
    # seed 0 finished; 1 stopped early; 2 preempted at step 4 (partial); 3 new; 4 fails.
    (dirs[0] / "summary.json").write_text(json.dumps(finished_summary(10)))
    early = finished_summary(6, stopped_by="early stopping")
    (dirs[1] / "summary.json").write_text(json.dumps(early))
    (dirs[2] / "config.json").write_text(json.dumps(configs[2].to_dict()))
    (dirs[2] / "summary.json").write_text(json.dumps(finished_summary(4, stopped_by="SIGTERM")))
    dirs[3].rmdir()
    assert [run.run_status(d, c) for d, c in zip(dirs, configs)] == [
        "finished",
        "finished",
        "partial",
        "new",
        "new",
    ]
    # A summary without the final-split eval the config asks for is not finished.
    no_final = {k: v for k, v in finished_summary(10).items() if k != "final"}
    (dirs[4] / "summary.json").write_text(json.dumps(no_final))
    assert run.run_status(dirs[4], configs[4]) == "new"

    called = []

    def fake_train(r, config, log_path):
        called.append(r.seed)
        if r.seed == 4:
            raise RuntimeError("boom")
        summary = finished_summary(config.train.max_steps)
        (Path(r.workdir) / "summary.json").write_text(json.dumps(summary))
        return summary

    lines = []
    failed = run.execute(runs, configs, fake_train, tmp_path / "demo", say=lines.append)
    assert called == [2, 3, 4]
    assert failed == [runs[4].name]
    assert "boom" in (dirs[4] / "error.txt").read_text()
    assert lines[0] == "[1/5] sst2/full/lr=0.0001/seed=0: finished, skipped"
    assert lines[-1].startswith("[5/5] sst2/full/lr=0.0001/seed=4: FAILED")
    log = [json.loads(x) for x in (tmp_path / "demo" / "sweep.jsonl").read_text().splitlines()]
    assert [e["status"] for e in log] == ["done", "done", "failed"]
    # A second pass retries only the failed run.
    called.clear()
    run.execute(runs, configs, fake_train, tmp_path / "demo", say=lines.append)
    assert called == [4]


@pytest.mark.parametrize("finished", [False, True], ids=["partial", "finished"])
def test_resuming_under_another_config_is_refused(tmp_path, finished):
    # A finished run of an edited sweep is not skipped as done: its results are stale.
    runs = sweep.expand(demo_sweep(tasks={"sst2": {}}, seeds=(0,)), tmp_path)[:1]
    config = sweep.build_config(runs[0])
    Path(runs[0].workdir).mkdir(parents=True)
    old = config.to_dict()
    old["optim"]["lr"] = 0.5
    (Path(runs[0].workdir) / "config.json").write_text(json.dumps(old))
    if finished:
        summary = {"final_step": config.train.max_steps, "best": 0.9}
        (Path(runs[0].workdir) / "summary.json").write_text(json.dumps(summary))
        assert run.run_status(runs[0].workdir, config) == "finished"
    failed = run.execute(runs, [config], lambda *a: pytest.fail("trained"), tmp_path, say=print)
    assert failed == [runs[0].name]
    assert "optim.lr" in (Path(runs[0].workdir) / "error.txt").read_text()


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def test_manifest_records_code_packages_devices_and_command(tmp_path):
    config = base_config()
    mesh = jax.make_mesh((1,), ("data",))
    manifest.write_manifest(config, str(tmp_path), mesh, argv=["train.py", "--flag=1"])
    config.seed = 7
    manifest.write_manifest(config, str(tmp_path), mesh, argv=["train.py", "--again"])
    starts = manifest.read_manifest(str(tmp_path))
    assert [s["command"] for s in starts] == [["train.py", "--flag=1"], ["train.py", "--again"]]
    assert [s["config"]["seed"] for s in starts] == [0, 7]  # the resume keeps the first record
    first = starts[0]
    assert first["git"]["commit"] == git("rev-parse", "HEAD")
    assert first["git"]["dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets"):
        assert first["packages"][name] == metadata.version(name)
    assert first["packages"]["python"] == ".".join(map(str, __import__("sys").version_info[:3]))
    assert first["devices"] == {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "mesh_shape": {"data": 1},
    }
    assert first["config"] == json.loads(json.dumps(base_config().to_dict(), default=str))
    assert first["host"]["cpu_count"] == __import__("os").cpu_count() and first["host"]["cpu_model"]
    assert first["start_time_utc"].endswith("+00:00")
    assert not list(tmp_path.glob("*.tmp*"))


def test_git_state_outside_a_checkout_is_none(tmp_path):
    assert manifest.git_state(str(tmp_path)) == {"commit": None, "dirty": None, "root": None}


# --- aggregation on a fake results folder -------------------------------------------------

SELECTION = {  # (setting, lr) -> holdout best per seed
    ("full", 1e-4): [0.80, 0.82, 0.84],  # mean 0.82: selected, though its dev is lower
    ("full", 3e-5): [0.79, 0.80, 0.81],  # mean 0.80
    ("lora", 1e-3): [0.70, 0.74],  # seed 2 missing
}
FINAL = {
    ("full", 1e-4): [0.85, 0.86, 0.90],
    ("full", 3e-5): [0.91, 0.92, 0.93],
    ("lora", 1e-3): [0.75, 0.79],
}


def write_fake_run(r, best, final):
    workdir = Path(r.workdir)
    workdir.mkdir(parents=True)
    lr = r.point["optim.lr"]
    summary = {
        "final_step": 10,
        "loop_time_s": 5.0,
        "steady_seconds_per_step": 0.1 + r.seed / 100,
        "metric": "accuracy",
        "best": best,
        "best_step": 10,
        "trainable_params": 1000 if r.setting == "full" else 10,
        "optimizer_state_bytes": 8000 if r.setting == "full" else 80,
        "peak_host_rss_bytes": 1 << 30 if r.seed else None,
        "peak_device_bytes": None,
        "stopped_by": None,
        "final": {"split": "validation", "step": 10, "loss": 0.3, "accuracy": final},
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
    records = [{"step": s, "kind": "train", "loss": 1.0 / s + lr + r.seed} for s in (5, 10)]
    records += [{"step": 10, "kind": "eval", "loss": 2.0 + r.seed, "accuracy": best}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    manifest.write_manifest(base_config(), str(workdir), None, argv=["python", "-m", "x"])


def test_report_selects_by_holdout_mean_and_reports_dev_mean_and_sample_std(tmp_path):
    fake = demo_sweep(
        tasks={"sst2": {}},
        settings={
            "full": Setting({"optim.preset": "full"}, {"optim.lr": (3e-5, 1e-4)}),
            "lora": Setting({"optim.preset": "lora", "peft.rank": 8}, {"optim.lr": (1e-3,)}),
        },
        seeds=(0, 1, 2),
    )
    for r in sweep.expand(fake, tmp_path / "runs"):
        key = (r.setting, r.point["optim.lr"])
        if r.seed < len(SELECTION[key]):
            write_fake_run(r, SELECTION[key][r.seed], FINAL[key][r.seed])
    log = [
        {"run": "sst2/full/lr=0.0001/seed=0", "status": "failed", "elapsed_s": 6.0},
        {"run": "sst2/full/lr=0.0001/seed=0", "status": "done", "elapsed_s": 60.0},
        {"event": "end", "wall_s": 90.0},
    ]
    (tmp_path / "runs" / "demo" / "sweep.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in log)
    )

    paths = report.write_report(fake, tmp_path / "runs", tmp_path / "results", "report cmd")

    rows = {r["setting"]: r for r in csv.DictReader(open(paths["csv"]))}
    full, lora = rows["full"], rows["lora"]
    assert full["selected"] == "lr=0.0001"
    assert float(full["selection_mean"]) == pytest.approx(0.82)
    assert float(full["selection_std"]) == pytest.approx(statistics.stdev([0.80, 0.82, 0.84]))
    assert float(full["final_mean"]) == pytest.approx(statistics.mean([0.85, 0.86, 0.90]))
    assert float(full["final_std"]) == pytest.approx(statistics.stdev([0.85, 0.86, 0.90]))
    assert float(full["seconds_per_step"]) == pytest.approx(0.11)
    assert (full["seeds"], full["trainable_params"], full["optimizer_state_bytes"]) == (
        "3",
        "1000",
        "8000",
    )
    assert full["peak_host_rss_bytes"] == str(1 << 30) and full["peak_device_bytes"] == ""
    assert lora["seeds"] == "2" and float(lora["final_mean"]) == pytest.approx(0.77)
    assert float(lora["final_std"]) == pytest.approx(statistics.stdev([0.75, 0.79]))

    md = paths["md"].read_text()
    assert "ddof=1" in md and "report cmd" in md and "Runs finished: 8 of 9" in md
    assert "| sst2 | full | lr=0.0001 | 0.8700 ± 0.0265 (validation, accuracy) |" in md
    assert "| sst2 | full | lr=3e-05 | 0.8000 ± 0.0100 | 0.9200 ± 0.0100 | 3/3 |" in md
    assert "1.5 min in 1 runner invocation(s); the runs took 1.1 min (1 timed" in md
    assert "their training loops 0.7 min" in md  # 8 runs' loop_time_s of 5 s
    assert manifest.cpu_model() in md
    for name in ("sst2-loss", "sst2-metric-vs-params"):
        assert paths[name].read_bytes().startswith(b"\x89PNG")
        assert f"]({'demo'}/{name}.png)" in md


def test_report_leaves_out_interrupted_and_stale_runs(tmp_path):
    fake = demo_sweep(
        tasks={"sst2": {}},
        settings={"full": Setting({"optim.preset": "full"}, {"optim.lr": (1e-4,)})},
        seeds=(0, 1, 2),
    )
    runs = sweep.expand(fake, tmp_path / "runs")
    for r, best, final in zip(runs, (0.80, 0.95, 0.97), (0.85, 0.99, 0.98)):
        write_fake_run(r, best, final)
    # Seed 1 was stopped by SIGTERM at step 4 of 10 (its summary is written all the same);
    # seed 2 finished under an lr the sweep no longer has.
    interrupted = Path(runs[1].workdir) / "summary.json"
    summary = json.loads(interrupted.read_text())
    interrupted.write_text(json.dumps({**summary, "final_step": 4, "stopped_by": "SIGTERM"}))
    old = sweep.build_config(runs[2]).to_dict()
    old["optim"]["lr"] = 0.5
    (Path(runs[2].workdir) / "config.json").write_text(json.dumps(old))

    paths = report.write_report(fake, tmp_path / "runs", tmp_path / "results", "report cmd")

    (row,) = csv.DictReader(open(paths["csv"]))
    assert row["seeds"] == "1" and float(row["final_mean"]) == pytest.approx(0.85)
    md = paths["md"].read_text()
    assert "Runs finished: 1 of 3" in md
    assert f"older sweep definition: {runs[2].name} " in md


def test_mean_curve_averages_seeds_on_common_steps():
    from experiments.plots import mean_curve

    a = [{"step": 5, "kind": "train", "loss": 1.0}, {"step": 10, "kind": "train", "loss": 3.0}]
    b = [{"step": 5, "kind": "train", "loss": 2.0}, {"step": 10, "kind": "eval", "loss": 9.0}]
    assert mean_curve([a, b], "train") == ([5], [1.5])
    assert mean_curve([a], "train") == ([5, 10], [1.0, 3.0])


TINY_SWEEP = """
from experiments.sweep import Setting, Sweep


def get_sweep(quick=False):
    return Sweep(
        config="configs/glue/minilm.py:{{task}}",
        tasks={{"sst2": {{"data.dir": "{data}"}}}},
        settings={{"probe": Setting({{"optim.preset": "linear_probe"}}, {{"optim.lr": (1e-3,)}})}},
        seeds=(0, 1) if quick else (0, 1, 2),
        overrides={{
            "model.name": "{model}",
            "data.max_length": 32,
            "data.buckets": (32,),
            "data.holdout_rows": 40,
            "data.eval_split": "holdout",
            "train.final_split": "validation",
            "train.batch_size": 8,
            "train.max_steps": 4,
            "train.eval_every": 2,
            "train.checkpoint_every": 2,
            "train.progress": False,
        }},
        notes="two seeds only",
    )
"""


def test_run_and_report_commands_end_to_end(tiny_bert_dir, sst2_slice, tmp_path, capsys):
    sweep_file = tmp_path / "tiny" / "sweep.py"
    sweep_file.parent.mkdir()
    sweep_file.write_text(TINY_SWEEP.format(data=sst2_slice, model=tiny_bert_dir))
    args = [str(sweep_file.parent), "--quick", f"--runs-root={tmp_path / 'runs'}"]
    assert run.main([*args, "--compile-cache="]) == 0
    out = capsys.readouterr().out
    assert "[1/2] sst2/probe/lr=0.001/seed=0: starting" in out
    assert "[2/2] sst2/probe/lr=0.001/seed=1: done in" in out
    assert run.main([*args, "--compile-cache="]) == 0
    assert "[2/2] sst2/probe/lr=0.001/seed=1: finished, skipped" in capsys.readouterr().out
    assert run.main([*args, "--print-launch"]) == 0
    assert capsys.readouterr().out == ""  # everything finished: nothing to launch
    workdir = tmp_path / "runs" / "tiny-quick" / "sst2/probe/lr=0.001/seed=0"
    (start,) = manifest.read_manifest(str(workdir))
    assert start["command"] == sys.argv  # in-process runs record the sweep's command line
    assert start["devices"]["mesh_shape"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert start["config"]["data"]["holdout_rows"] == 40 and start["config"]["seed"] == 0

    out_dir = tmp_path / "results"
    assert report.main([*args, f"--out-dir={out_dir}"]) == 0
    md = (out_dir / "tiny-quick.md").read_text()
    assert "two seeds only" in md and "Runs finished: 2 of 2" in md
    assert f"`python -m experiments.run {' '.join(args)} --compile-cache=`" in md
    row = next(csv.DictReader(open(out_dir / "tiny-quick.csv")))
    finals = [
        json.loads((workdir.parent / f"seed={s}" / "summary.json").read_text())["final"]
        for s in (0, 1)
    ]
    assert row["seeds"] == "2" and finals[0]["split"] == "validation"
    expected = statistics.mean(f["accuracy"] for f in finals)
    assert float(row["final_mean"]) == pytest.approx(expected)


def test_report_without_a_final_split_reports_the_holdout_and_says_so(tmp_path):
    fake = demo_sweep(
        tasks={"elpv_binary": {}},
        settings={"full": Setting({"optim.preset": "full"}, {"optim.lr": (1e-4,)})},
        seeds=(0, 1),
    )
    for r in sweep.expand(fake, tmp_path / "runs"):
        write_fake_run(r, [0.80, 0.84][r.seed], final=None)
        path = Path(r.workdir) / "summary.json"
        summary = json.loads(path.read_text())
        del summary["final"]  # train.final_split unset
        path.write_text(json.dumps(summary))
    paths = report.write_report(fake, tmp_path / "runs", tmp_path / "results", "cmd")
    (row,) = csv.DictReader(open(paths["csv"]))
    assert float(row["final_mean"]) == pytest.approx(0.82)
    assert float(row["final_std"]) == pytest.approx(statistics.stdev([0.80, 0.84]))
    assert row["final_split"] == report.SELECTION_AS_FINAL
    assert "repeats the selection (holdout) number" in paths["md"].read_text()


def test_vision_transfer_quick_runs_are_valid_configs_on_one_stratified_split():
    quick, full = sweep.load("vision_transfer", quick=True), sweep.load("vision_transfer")
    settings = {"full", "linear_probe", "lora", "top2", "llrd"}
    tasks = {"fashion_mnist", "elpv_binary", "elpv_grades"}
    for study in (quick, full):
        runs = sweep.expand(study)
        assert {r.setting for r in runs} == settings and {r.task for r in runs} == tasks
    quick_runs = sweep.expand(quick)
    assert len(quick_runs) == 3 * 5 * 2 and quick.notes
    for r in quick_runs[::2]:
        config = sweep.build_config(r)
        assert config.data.stratify and config.data.eval_split == "holdout"
        assert config.train.eval_every == config.train.max_steps  # one eval: nothing picked
        assert config.data.image_size % 14 == 0 and config.optim.preset == PRESET[r.setting]
    grades = sweep.build_config(next(r for r in quick_runs if r.task == "elpv_grades"))
    binary = sweep.build_config(next(r for r in quick_runs if r.task == "elpv_binary"))
    assert grades.data.holdout_rows == binary.data.holdout_rows == 656
    assert sweep.build_config(sweep.expand(full)[0]).data.image_size == 224


PRESET = {
    "full": "full",
    "linear_probe": "linear_probe",
    "lora": "lora",
    "top2": "top_k_layers",
    "llrd": "llrd",
}
