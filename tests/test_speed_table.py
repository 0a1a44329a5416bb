"""tools/speed_table.py: its rows are valid variants of the real configs, and the table says
what it measured (ratios against the peer and LoRA against full SFT)."""

from __future__ import annotations

import importlib.util

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("speed_table", REPO / "tools" / "speed_table.py")
speed_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed_table)


def test_rows_are_variants_of_the_real_configs():
    tasks = {"glue": "sst2", "gsm8k": "gsm8k", "fashion_mnist": "fashion_mnist"}
    for row in speed_table.ROWS:
        config = speed_table.bench.with_overrides(row.make(), row.overrides)  # unknown keys raise
        assert config.data.task == tasks[row.data], row.name
        assert (row.group == "sft") == (row.data == "gsm8k"), row.name
        assert row.peer in (
            None,
            ("glue", "full"),
            ("glue", "linear_probe"),
            ("vision", "full"),
        ), row.name
        if row.peer:
            assert config.optim.preset == row.peer[1], row.name


def test_markdown_reports_peer_ratio_and_lora_over_full():
    row = lambda name, step, sft, **kw: dict(
        name=name,
        step_s_mean=step,
        samples_per_s=32 / step,
        achieved_gflops=50.0,
        group="sft" if sft else "",
        **kw,
    )
    rows = [
        row("MiniLM SST-2, full fine-tuning", 0.5, False, peer_step_s=0.6),
        row("MiniLM SST-2, LoRA r=8", 0.4, False),
        row("SmolLM2-135M GSM8K SFT, LoRA r=8", 7.0, True),
        row("SmolLM2-135M GSM8K SFT, full", 10.0, True),
    ]
    table = speed_table.markdown(rows, peak=200.0, tests_s=600.0, header="h")
    lines = table.splitlines()
    assert "| 0.500 | 64.00 | 50.0 | 0.25 | 0.600 | **1.20x** |" in lines[4]
    assert lines[5].endswith("| - | - |")
    assert "SFT LoRA / full step time: 0.70." in table
    assert "Default test run (`python -m pytest`): 10.0 min." in table
