import numpy as np
import pytest

from finetune_jax import tree_paths
from finetune_jax.training import rules

PARAMS = {
    "bert": {"encoder": {"layer_0": {"query": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}}}},
    "classifier": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)},
}


def test_paths_are_slash_joined_in_tree_order():
    assert tree_paths.param_paths(PARAMS) == [
        "bert/encoder/layer_0/query/bias",
        "bert/encoder/layer_0/query/kernel",
        "classifier/bias",
        "classifier/kernel",
    ]


def test_first_full_match_wins():
    resolved = rules.resolve(
        [(r".*/bias", "b"), (r"classifier/.*", "head"), (".*", "rest")], PARAMS
    )
    assert resolved["classifier"]["bias"] == "b"
    assert resolved["classifier"]["kernel"] == "head"
    assert resolved["bert"]["encoder"]["layer_0"]["query"]["kernel"] == "rest"


def test_regex_must_match_the_whole_path():
    # 'classifier' alone is a prefix of the path, not a full match.
    with pytest.raises(rules.RuleError, match="classifier/kernel"):
        rules.resolve([("classifier", 1), (".*/bias", 2)], PARAMS)


def test_unmatched_params_are_all_named():
    with pytest.raises(rules.RuleError) as err:
        rules.resolve([(r".*/bias", 0)], PARAMS, name="optim.rules")
    message = str(err.value)
    assert "optim.rules" in message
    assert "bert/encoder/layer_0/query/kernel" in message and "classifier/kernel" in message
    assert "catch-all" in message


def test_malformed_rules_are_rejected():
    with pytest.raises(rules.RuleError, match="invalid regex"):
        rules.resolve([("(", 1)], PARAMS)
    with pytest.raises(rules.RuleError, match=r"\(regex, value\) pair"):
        rules.resolve([("only-a-regex",)], PARAMS)


def test_transform_and_unused_rules():
    resolved = rules.resolve([(r".*/bias", "2"), (".*", "1")], PARAMS, transform=float)
    assert resolved["classifier"]["bias"] == 2.0
    assert rules.unused_rules([(".*", 1), ("never", 2)], PARAMS) == ["never"]
