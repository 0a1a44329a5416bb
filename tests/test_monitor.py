"""`monitor` on a tiny BERT trained on real SST-2 rows: GSM8K questions are flagged as drift,
two interleaved halves of SST-2's dev split are not; report, plots, JSON without NaN, exit
codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from finetune_jax.monitor import monitor
from tests.helpers import REPO, SHARED_DATA


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """(reference, same-distribution, shifted) files: SST-2 dev even rows, odd rows, and
    GSM8K test questions in the run's `sentence` column."""
    out = tmp_path_factory.mktemp("monitor_data")
    header, *dev = (SHARED_DATA / "glue" / "sst2" / "dev.tsv").read_text().splitlines(True)
    (out / "even.tsv").write_text(header + "".join(dev[0:400:2]))
    (out / "odd.tsv").write_text(header + "".join(dev[1:400:2]))
    lines = (SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]
    with open(out / "gsm8k.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence"])
        writer.writerows([json.loads(line)["question"]] for line in lines)
    return out / "even.tsv", out / "odd.tsv", out / "gsm8k.csv"


def _strict_json(path):
    def no_constant(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


def test_monitor_flags_a_shifted_set_and_not_a_same_distribution_split(
    tiny_bert_run, data_files, tmp_path
):
    workdir, config = tiny_bert_run
    reference, same, shifted = data_files
    kwargs = dict(reference=str(reference), permutations=200, max_rows=200)
    calm = monitor(config, str(workdir), str(same), str(tmp_path / "same"), **kwargs)
    alarm = monitor(config, str(workdir), str(shifted), str(tmp_path / "shifted"), **kwargs)
    assert calm["drift"] is False and alarm["drift"] is True
    flagged = {c["statistic"] for c in alarm["checks"] if c["flagged"]}
    assert {"input length PSI", "embedding MMD p-value"} <= flagged
    statistics = [c["statistic"] for c in calm["checks"]]
    assert "accuracy drop" in statistics  # both sides have labels
    assert "accuracy drop" not in [c["statistic"] for c in alarm["checks"]]  # GSM8K has none
    for name in ("same", "shifted"):
        written = _strict_json(tmp_path / name / "drift.json")
        assert written["checks"] == (calm if name == "same" else alarm)["checks"]
        report = (tmp_path / name / "report.md").read_text()
        assert all(c in report for c in statistics[:3])
        for plot in ("lengths.png", "predicted_labels.png", "confidence.png", "embeddings.png"):
            assert f"]({plot})" in report and (tmp_path / name / plot).stat().st_size > 1000


def test_monitor_defaults_to_the_runs_eval_split_and_exits_by_verdict(
    tiny_bert_run, data_files, tmp_path
):
    workdir, _ = tiny_bert_run
    command = [sys.executable, "-m", "finetune_jax.monitor", f"--workdir={workdir}"]
    command += ["--permutations=50", "--max_rows=100"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args):
        return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, env=env)

    done = run(f"--input={data_files[2]}", f"--out={tmp_path / 'a'}")
    assert done.returncode == 1, done.stderr
    assert _strict_json(tmp_path / "a" / "drift.json")["reference"] == "validation"
    done = run(f"--input={tmp_path / 'missing.csv'}", f"--out={tmp_path / 'b'}")
    assert done.returncode == 2 and "error: --input=" in done.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # 40 MiniLM train steps + 4 passes over ~436 rows: minutes on 2 cores
def test_sst2_minilm_flags_gsm8k_and_not_the_dev_split_in_halves(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quick", REPO / "configs/glue/sst2_minilm.py")
    quick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quick)
    config = quick.get_config()
    config.data.dir = str(SHARED_DATA / "glue" / "sst2")
    config.train.max_steps = config.train.eval_every = config.train.checkpoint_every = 40
    config.train.progress = False
    from finetune_jax.train import train

    train(config, str(tmp_path / "run"))
    header, *dev = (SHARED_DATA / "glue" / "sst2" / "dev.tsv").read_text().splitlines(True)
    half = len(dev) // 2
    (tmp_path / "first.tsv").write_text(header + "".join(dev[:half]))
    (tmp_path / "second.tsv").write_text(header + "".join(dev[half:]))
    questions = (SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:half]
    with open(tmp_path / "gsm8k.csv", "w", newline="") as f:
        csv.writer(f).writerows([["sentence"], *([json.loads(q)["question"]] for q in questions)])
    kwargs = dict(reference=str(tmp_path / "first.tsv"))
    run = str(tmp_path / "run")
    calm = monitor(config, run, str(tmp_path / "second.tsv"), str(tmp_path / "calm"), **kwargs)
    alarm = monitor(config, run, str(tmp_path / "gsm8k.csv"), str(tmp_path / "alarm"), **kwargs)
    assert calm["drift"] is False, calm["checks"]
    assert alarm["drift"] is True
    flagged = {c["statistic"] for c in alarm["checks"] if c["flagged"]}
    assert {"input length PSI", "embedding MMD p-value"} <= flagged
