"""tools/bench.py: the --versus comparison of variants of one config, side by side; image configs
and their torch peer (tools/peer_torch_vision.py)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO, tiny_config
from tests.test_image_train import image_config, tiny_dinov2_dir  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_overrides_parses_values_and_keeps_the_original(bench, tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    other = bench.with_overrides(config, "optim.preset=linear_probe,optim.lr=1,peft.rank=8")
    assert (other.optim.preset, other.optim.lr, other.peft.rank) == ("linear_probe", 1.0, 8)
    assert isinstance(other.optim.lr, float)
    assert (config.optim.preset, config.peft.rank) == ("full", 0)
    with pytest.raises(
        KeyError, match=r"unknown config key 'optim\.lrr' in --versus; keys there: .*\blr\b"
    ):
        bench.with_overrides(config, "optim.lrr=1e-3")


def test_frozen_backbone_benches_cheaper_than_full(bench, tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    full, probe = bench.bench_side_by_side(
        [config, bench.with_overrides(config, "optim.preset=linear_probe")], 2, 1
    )
    assert probe["gflop_per_step"] < full["gflop_per_step"]
    assert probe["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert probe["trainable_params"] < full["trainable_params"]
    ratios = bench.ratios(probe, full)
    assert ratios["ratio_gflop_per_step"] < 1 and ratios["ratio_optimizer_state_bytes"] < 1


def test_side_by_side_warms_each_then_takes_turns(bench, tiny_bert_dir, sst2_slice, monkeypatch):
    """Timed steps alternate between the configs (load that comes and goes falls on all),
    after every config's warm-up."""
    config = tiny_config(tiny_bert_dir, sst2_slice)
    order, step = [], bench._Run.step

    def recorded(run, timed):
        order.append((run.config.optim.preset, timed))
        step(run, timed)

    monkeypatch.setattr(bench._Run, "step", recorded)
    results = bench.bench_side_by_side(
        [config, bench.with_overrides(config, "optim.preset=linear_probe")], 2, 1
    )
    assert (
        order
        == [("full", False), ("linear_probe", False)]
        + [
            ("full", True),
            ("linear_probe", True),
        ]
        * 2
    )
    assert [result["steps_timed"] for result in results] == [2, 2]


def _image_config(request):
    config = image_config(request.getfixturevalue("tiny_dinov2_dir"))
    config.train.batch_size = 4
    return config


def test_image_config_benches(bench, request):
    """Image batches (pixels, no tokens) bench: one compiled shape, images/s as samples/s."""
    result = bench.bench(_image_config(request), 2, 1)
    assert result["samples_per_s"] > 0 and result["gflop_per_step"] > 0
    assert result["tokens_per_s"] == 0 and result["compiled_train_shapes"] == 1


@pytest.mark.slow  # a torch + transformers subprocess: ~40 s on 2 cores
def test_vision_torch_peer_runs_on_the_benched_model_and_size(bench, request):
    config = _image_config(request)
    model_dir = str(request.getfixturevalue("tiny_dinov2_dir"))
    script = str(REPO / "tools" / "peer_torch_vision.py")
    peer = bench.torch_peer(script, config, 2, model_dir)
    assert peer["torch_samples_per_s"] == pytest.approx(4 / peer["torch_step_s"], rel=0.01)
