"""The allowed range of every numeric config key, as one table, and the check that applies it.

`training/builder.py`'s `build` calls `check_ranges` first, so a value that cannot be right
(`optim.lr=-1e-4` would climb the loss; `train.batch_size=0`) stops the run in one line
naming the key, its value and the range, before any model, tokenizer or data loads. Checks
that need more than the value (a mesh that divides the devices, `optim.top_k` against the
model's depth) stay with the code that knows the rest. `tests/test_config_ranges.py` fails
when a numeric key of `config.base_config()` has no row here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (ends included unless `*_open`), plus the values `also`
    (sentinels such as -1 = "the remaining devices"). Always finite: NaN and inf never pass."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The range in words: '>= 1', '> 0', '0 <= x < 1', 'any finite number', ... or -1."""
        low = f"{_number(self.low)} {'<' if self.low_open else '<='} "
        high = f" {'<' if self.high_open else '<='} {_number(self.high)}"
        if math.isinf(self.low) and math.isinf(self.high):
            text = "any finite number"
        elif math.isinf(self.high):
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        elif math.isinf(self.low):
            text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = f"{low}x{high}"
        return text + "".join(f", or {_number(v)}" for v in self.also)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # 0 <= x <= 1
BELOW_1 = Range(0, 1, high_open=True)  # 0 <= x < 1
ANY = Range()  # any finite number
MESH_AXIS = Range(1, also=(-1,))  # -1 = the remaining devices

# Dotted key -> allowed range. A tuple-valued key (data.buckets) is checked element-wise.
RANGES: Mapping[str, Range] = {
    "seed": AT_LEAST_0,
    # -- model -----------------------------------------------------------------------------
    "model.dropout": Range(high=1, high_open=True),  # < 0 keeps the pretrained config's
    "model.lm_loss_chunk": AT_LEAST_0,  # 0 = full logits
    "model.segmentation_layers": AT_LEAST_1,  # at most the model's depth (checked at build)
    "model.decoder_channels": Range(4),  # a multiple of 4 (checked by the segmentation kind)
    # -- data ------------------------------------------------------------------------------
    "data.holdout_rows": AT_LEAST_0,
    "data.max_train_rows": AT_LEAST_0,  # 0 = all
    "data.max_eval_rows": AT_LEAST_0,  # 0 = all
    "data.split_seed": AT_LEAST_0,  # numpy's generators take no negative seed
    "data.max_length": AT_LEAST_1,
    "data.label_range": ANY,  # (low, high) of a regression target; the order: text_tasks
    "data.buckets": AT_LEAST_1,
    "data.prefetch": AT_LEAST_0,  # 0 = prepare batches in the step
    "data.image_size": AT_LEAST_0,  # 0 = as the model saved it
    "data.augment_scale": Range(0, 1, low_open=True),  # area fractions of the random crop
    "data.max_boxes": AT_LEAST_1,
    "data.max_detections": AT_LEAST_1,
    "data.nms_iou": Range(0, 1, low_open=True),  # 1 = no NMS
    "data.draw_score": Range(0, 1),
    "data.ignore_index": ANY,  # a mask value; class ids are 0..C-1
    "data.crop_size": AT_LEAST_0,  # 0 = data.image_size
    "data.audio_seconds": POSITIVE,
    # -- optim -----------------------------------------------------------------------------
    "optim.lr": AT_LEAST_0,  # negative climbs the loss; 0 = the pretrained model, measured
    "optim.warmup_fraction": FRACTION,
    "optim.b1": BELOW_1,
    "optim.b2": BELOW_1,
    "optim.eps": POSITIVE,  # 0 divides 0 by 0 for a trainable leaf with no gradient
    "optim.weight_decay": AT_LEAST_0,
    "optim.clip_norm": ANY,  # <= 0 disables clipping
    "optim.top_k": AT_LEAST_0,
    "optim.llrd_decay": Range(0, 1, low_open=True),
    # -- peft ------------------------------------------------------------------------------
    "peft.rank": AT_LEAST_0,  # 0 = no LoRA
    "peft.alpha": POSITIVE,
    "peft.dropout": BELOW_1,
    "peft.num_virtual_tokens": AT_LEAST_1,
    # -- train -----------------------------------------------------------------------------
    "train.batch_size": AT_LEAST_1,
    "train.microbatches": AT_LEAST_1,
    "train.max_steps": AT_LEAST_0,  # 0 = evaluate the pretrained model as step 0
    "train.log_every": AT_LEAST_0,  # intervals: 0 = only the last step
    "train.eval_every": AT_LEAST_0,
    "train.checkpoint_every": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_1,
    "train.patience": AT_LEAST_0,  # 0 = never stop early
    # -- generate --------------------------------------------------------------------------
    "generate.num_samples": AT_LEAST_0,
    "generate.max_new_tokens": AT_LEAST_1,
    "generate.temperature": AT_LEAST_0,  # 0 = greedy
    "generate.top_k": AT_LEAST_0,  # 0 = all tokens
    "generate.batch_size": AT_LEAST_1,
    "generate.seed": AT_LEAST_0,
    "generate.num_beams": AT_LEAST_1,
    # -- mesh ------------------------------------------------------------------------------
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "mesh_dcn.data": AT_LEAST_1,
    "mesh_dcn.fsdp": AT_LEAST_1,
    "mesh_dcn.tensor": AT_LEAST_1,
}


def out_of_range(config: Any) -> list[str]:
    """'key=value: allowed ...' for each key of RANGES whose value `config` holds outside it
    (a key the config lacks is skipped)."""
    return [problem for _, problem in _problems(config)]


def check_ranges(config: Any) -> None:
    """Raises ValueError naming every numeric key of `config` (a ConfigDict) whose value is
    out of its range, with the value and the range."""
    problems = _problems(config)
    if problems:
        first = problems[0][0]
        raise ValueError(
            f"config value{'s' if len(problems) > 1 else ''} out of range: "
            + "; ".join(problem for _, problem in problems)
            + f". Fix {'them' if len(problems) > 1 else 'it'} in the config file or on the "
            f"command line (--config.{first}=...)"
        )


def _problems(config: Any) -> list[tuple[str, str]]:
    problems = []
    for key, allowed in RANGES.items():
        value = _lookup(config, key)
        if value is _MISSING:
            continue
        if isinstance(value, (tuple, list)):
            bad = [v for v in value if not allowed.allows(v)]
            if bad:
                problems.append(
                    (
                        key,
                        f"{key}={tuple(value)!r}: each element must be {allowed.describe()}, "
                        f"not {', '.join(map(repr, bad))}",
                    )
                )
        elif not allowed.allows(value):
            problems.append((key, f"{key}={value!r} must be {allowed.describe()}"))
    return problems


_MISSING = object()


def _lookup(config: Any, key: str) -> Any:
    """The value at dotted `key` of a ConfigDict (or dict), or _MISSING."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return _MISSING
        node = node[part]
    return node
