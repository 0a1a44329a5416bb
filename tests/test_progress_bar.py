"""The training run's progress as a person sees it: on a 120-column terminal a real bar with
every other line above it and the last line shown once; in a log, plain lines."""

import re
import sys

import pytest

from finetune_jax.train import train
from finetune_jax.training.progress_bar import Progress
from tests.helpers import tiny_config
from tests.terminal import Terminal

METRICS = {  # a log step's record as TrainLog writes it
    "loss": 0.6778453,
    "grad_norm": 0.5270981,
    "lr": 5.833333e-05,
    "skipped": 0.0,
    "seconds_per_step": 10.0912,
}


@pytest.fixture
def terminal():
    term = Terminal(columns=120)
    yield term
    term.close()


def bar_lines(screen):
    return [line for line in screen if re.search(r"\d+/\d+ \[", line)]


def test_bar_at_120_columns_is_a_bar(terminal, monkeypatch):
    terminal.as_console(monkeypatch)
    bar = Progress(0, 3000)
    bar.update(1200, METRICS)
    [line] = terminal.screen()  # one line: nothing wrapped
    cells = line.split("|")[1]  # 40%|████      | 1200/3000 [...]
    assert len(cells) >= 40, line
    assert "loss=0.6778" in line and "lr=5.83e-05" in line
    bar.close()


def test_lines_land_above_the_bar_and_its_last_line_shows_once(terminal, monkeypatch):
    terminal.as_console(monkeypatch)
    bar = Progress(0, 6)
    bar.update(3, METRICS)
    bar.log("step 3: eval loss=0.6857 accuracy=0.5525 (best)")
    print("final eval of step 3 on validation: accuracy=0.5525")
    print("WARNING: a library's warning", file=sys.stderr)
    bar.update(6, METRICS)
    bar.close()
    print("outputs in /tmp/run:")
    screen = terminal.screen()
    assert screen[:3] == [
        "step 3: eval loss=0.6857 accuracy=0.5525 (best)",
        "final eval of step 3 on validation: accuracy=0.5525",
        "WARNING: a library's warning",
    ]
    assert len(bar_lines(screen)) == 1 and "6/6" in screen[3]
    assert screen[4:] == ["outputs in /tmp/run:"]


def test_in_a_log_each_log_step_is_one_plain_line(capsys):
    bar = Progress(0, 6)  # stderr is no terminal here
    bar.update(3, METRICS)
    bar.log("step 3: eval accuracy=0.5")
    bar.update(6, {**METRICS, "skipped": 2.0})
    bar.close()
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 3", "step 3", "step 6"]
    assert lines[0].startswith("step 3: loss=0.6778 lr=5.833e-05 grad_norm=0.5271 ")
    assert lines[0].endswith("]") and "[3/6 " in lines[0]
    assert "skipped=2" in lines[2]


def test_a_real_run_reads_well_on_a_terminal(tiny_bert_dir, sst2_slice, tmp_path, monkeypatch):
    terminal = Terminal(columns=120)
    config = tiny_config(
        tiny_bert_dir, sst2_slice, progress=True, log_every=2, final_split="validation"
    )
    config.data.eval_split, config.data.holdout_rows = "holdout", 16
    terminal.as_console(monkeypatch)
    try:
        train(config, str(tmp_path))
        screen = terminal.screen()
    finally:
        terminal.close()
    evals = [i for i, line in enumerate(screen) if re.match(r"step \d: eval loss=", line)]
    assert len(evals) == 2  # steps 3 and 6, each a line of its own
    [final] = [i for i, line in enumerate(screen) if line.startswith("final eval of step")]
    [bar] = bar_lines(screen)  # shown once, below every line printed while it was open
    assert screen.index(bar) > final > evals[-1] and "6/6" in bar
    assert screen[screen.index(bar) + 1].startswith("outputs in ")
