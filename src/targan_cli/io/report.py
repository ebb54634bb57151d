"""JSON reports (evaluate --json, info --json, demo.json): strict JSON, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from targan_cli.io.atomic import atomic_output


def strict_json(value: Any) -> Any:
    """``value`` with every nan as None and every infinity as "inf" / "-inf": strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def json_text(data: Any) -> str:
    """``data`` as indented strict JSON (``strict_json``; other types by ``str``), one final newline."""
    return json.dumps(strict_json(data), indent=2, allow_nan=False, default=str) + "\n"


def write_json(data: Any, path: str | Path, overwrite: bool = False) -> Path:
    """``json_text(data)`` written atomically as a report (io.atomic: a JSON file replaces only a JSON file)."""
    with atomic_output(path, overwrite=overwrite, kind="json") as temporary:
        temporary.write_text(json_text(data), encoding="utf-8")
    return Path(path)
