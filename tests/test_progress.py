"""Progress of long phases (evals, audio features): a bar on a terminal that leaves no trace,
plain lines in a log, nothing on other processes; prints land above open bars."""

import sys

import jax
import pytest
from tqdm import tqdm

from finetune_jax import progress
from tests.terminal import Terminal


@pytest.fixture
def terminal(monkeypatch):
    """A 120-column terminal (`as_console` in the test makes it stdout and stderr)."""
    term = Terminal(columns=120)
    yield term
    term.close()


def test_track_in_a_log_prints_plain_lines_and_yields_every_item(capsys):
    items = list(progress.track(range(5), 5, "eval", "batch", every_s=0))
    assert items == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"eval: {i}/5 batches" for i in range(1, 6)]
    assert "left" in lines[0]


def test_track_in_a_log_is_quiet_for_a_short_phase(capsys):
    assert list(progress.track(range(3), 3, "eval", "batch")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_track_on_a_terminal_draws_a_bar_that_leaves_no_trace(terminal, monkeypatch):
    terminal.as_console(monkeypatch)
    seen = []
    for item in progress.track(range(4), 4, "eval", "batch"):
        if item == 2:
            seen.append(terminal.screen())
    assert any(line.startswith("eval:") and "/4 " in line for line in seen[0])
    assert terminal.screen() == []  # cleared when done


def test_track_is_silent_on_other_processes(capsys, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert list(progress.track(range(3), 3, "eval", "batch", every_s=0)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_prints_while_a_bar_is_open_land_on_their_own_lines_above_it(terminal, monkeypatch):
    terminal.as_console(monkeypatch)
    with progress.printing_above_bars():
        bar = tqdm(total=10, desc="train", file=progress.terminal_stream(), dynamic_ncols=True)
        bar.update(3)
        print("step 3: eval accuracy=0.5")
        print("WARNING: a library warning", file=sys.stderr)
        sys.stdout.write("a line written in ")
        sys.stdout.write("two parts\n")
        bar.update(2)
        bar.close()
    screen = terminal.screen()
    assert screen[:3] == [
        "step 3: eval accuracy=0.5",
        "WARNING: a library warning",
        "a line written in two parts",
    ]
    assert len(screen) == 4 and screen[3].startswith("train:") and "5/10" in screen[3]
    assert sys.stdout is terminal.stream and sys.stderr is terminal.stream  # restored
