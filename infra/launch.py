"""Start local services (the survey server) as child processes and stop them reliably."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lensminer.exceptions import SurveyServerError

__all__ = ["READY_PREFIX", "survey_server_process"]

logger = logging.getLogger(__name__)

# Once the survey server accepts connections, it prints this prefix and its base URL on one
# stdout line.
READY_PREFIX = "LENSMINER_SURVEY_SERVER "


def _drain(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@contextmanager
def survey_server_process(
    arguments: Sequence[str], startup_timeout: float = 120.0
) -> Iterator[str]:
    """Run ``python -m lensminer.infra.survey_server ARGUMENTS`` and yield its base URL.

    The server binds 127.0.0.1 on a free port. It is terminated (then killed after 10 s) when the
    context exits, also on errors and KeyboardInterrupt.

    Raises
    ------
    SurveyServerError
        If the server exits or prints no URL within ``startup_timeout`` seconds; the message
        carries the end of its output.
    """
    command = [
        sys.executable,
        "-m",
        "lensminer.infra.survey_server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *arguments,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr_lines: list[str] = []
    threading.Thread(target=_drain, args=(process.stderr, stderr_lines), daemon=True).start()
    try:
        base_url = _wait_for_url(process, startup_timeout, stderr_lines)
        logger.debug("survey server pid %d serving %s", process.pid, base_url)
        threading.Thread(target=_drain, args=(process.stdout, []), daemon=True).start()
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("survey server pid %d ignored SIGTERM for 10 s; killing it", process.pid)
            process.kill()
            process.wait()


def _wait_for_url(process: subprocess.Popen, timeout: float, stderr_lines: list[str]) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    # readline blocks, so a watchdog thread ends a server that never reports ready.
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
    finally:
        timer.cancel()
    tail = "".join(stderr_lines[-20:])
    reason = "timed out" if time.monotonic() >= deadline else f"exited with code {process.poll()}"
    raise SurveyServerError(
        f"survey server {reason} before reporting its URL; its last output:\n{tail}"
    )
