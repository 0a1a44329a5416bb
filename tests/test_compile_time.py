"""tools/compile_time.py: runs, and the scanned program does not grow with depth."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow  # five compiles in a subprocess: ~20-40 s on 2 cores
def test_compile_time_tool_prints_four_cells_and_scan_keeps_the_program_size(tmp_path):
    out = tmp_path / "figures.json"
    command = [
        sys.executable,
        str(REPO / "tools" / "compile_time.py"),
        "--layers=1,3",
        "--hidden=64",
        "--vocab=128",
        "--batch=2",
        "--length=16",
        "--repeats=1",
        f"--json={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    assert "compile s" in done.stdout
    rows = {(r["layers"], r["layout"]): r for r in json.loads(out.read_text())}
    assert sorted(rows) == [(1, "scanned"), (1, "unrolled"), (3, "scanned"), (3, "unrolled")]
    assert all(r["compile_s"] > 0 for r in rows.values())
    unrolled = rows[3, "unrolled"]["hlo_kb"] / rows[1, "unrolled"]["hlo_kb"]
    scanned = rows[3, "scanned"]["hlo_kb"] / rows[1, "scanned"]["hlo_kb"]
    assert unrolled > 1.5 and scanned < 1.05
