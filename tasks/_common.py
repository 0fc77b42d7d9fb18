"""Helpers shared by the Prefect task wrappers."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from lensminer.exceptions import CheckpointError, ConfigError, StoreError

__all__ = ["PERMANENT_ERRORS", "as_record", "retry_unless_permanent"]

# Failures that a retry cannot fix: invalid settings, stores or checkpoints.
PERMANENT_ERRORS = (CheckpointError, ConfigError, StoreError)


def as_record(value: Any) -> dict[str, Any]:
    """Turn a library result (a dataclass or mapping) into a JSON-friendly dict."""
    record = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
    return json.loads(json.dumps(record, default=str))


def retry_unless_permanent(task: Task, task_run: TaskRun, state: State) -> bool:
    """Return whether a failed task run should retry: not when it raised a permanent error.

    Use as a task's ``retry_condition_fn``.
    """
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except Exception:
        return True
    return True
