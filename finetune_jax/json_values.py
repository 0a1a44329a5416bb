"""JSON the project writes: NaN and infinities as null, numpy / jax scalars as Python values.

A leaf module (imports nothing from the package), so workdir files, the monitor's drift.json
and any other writer share one rule.
"""

from __future__ import annotations

import json
import math
from typing import Any


def json_text(value: Any, **kwargs: Any) -> str:
    """`json.dumps(value, **kwargs)` with NaN and infinities written as null.

    Python writes them as the bare words `NaN` / `Infinity`, which are not JSON: jq, browsers
    and most other readers reject the whole file. Every JSON file the project writes goes
    through here (`allow_nan=False` makes a value this misses an error, not a bad file).
    """
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def finite(value: Any) -> Any:
    """`value` made JSON-safe, recursively: NaN / inf -> None, numpy / jax scalars -> Python."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / jax scalars
        return finite(value.item())
    return value
