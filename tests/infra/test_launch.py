"""Tests of starting the survey server as a child process."""

from __future__ import annotations

import httpx
import pytest

from lensminer.exceptions import SurveyServerError
from lensminer.infra.launch import survey_server_process


def test_server_process_serves_and_stops():
    with survey_server_process(["--sky", "--seed", "1"]) as base_url:
        response = httpx.get(
            f"{base_url}fits-cutout", params={"ra": 150.0, "dec": 2.0, "size": 16}, timeout=60
        )
        assert response.status_code == 200
        assert base_url.startswith("http://127.0.0.1:")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base_url}fits-cutout", params={"ra": 150.0, "dec": 2.0, "size": 16}, timeout=5)


def test_server_process_bad_arguments():
    with pytest.raises(SurveyServerError, match="before reporting its URL"):
        with survey_server_process(["--no-such-option"], startup_timeout=60):
            pass
