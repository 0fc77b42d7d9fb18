"""Helpers shared by the Prefect task wrappers."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["as_record"]


def as_record(value: Any) -> dict[str, Any]:
    """Turn a library result (a dataclass or mapping) into a JSON-friendly dict."""
    record = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
    return json.loads(json.dumps(record, default=str))
