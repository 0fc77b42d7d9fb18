"""Tests of the helpers shared by the Prefect tasks."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from lensminer.exceptions import CheckpointError, ConfigError, DownloadError, StoreNotFoundError
from lensminer.tasks._common import retry_unless_permanent


@pytest.mark.parametrize(
    "error", [ConfigError("bad"), CheckpointError("bad"), StoreNotFoundError("missing")]
)
def test_permanent_errors_not_retried(error: Exception) -> None:
    assert retry_unless_permanent(None, None, Failed(data=error)) is False


@pytest.mark.parametrize("error", [DownloadError("timed out"), OSError("reset"), KeyError("x")])
def test_other_errors_retried(error: Exception) -> None:
    assert retry_unless_permanent(None, None, Failed(data=error)) is True
