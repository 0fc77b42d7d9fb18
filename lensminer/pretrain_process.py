"""Pretraining in a child process, for programs that must not be rerun by DDP.

Lightning's ``ddp`` strategy starts each further rank by running the current command line again.
A Prefect flow that downloads, pretrains and embeds in one process would then run every stage
once per rank. :func:`pretrain_in_subprocess` instead starts ``python -m
lensminer.pretrain_process REQUEST RESULT``, a command that runs :func:`lensminer.pretrain.pretrain`
and nothing else, so the ranks Lightning relaunches reach the same call.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only

from lensminer import exceptions
from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.exceptions import LensMinerError, PretrainError
from lensminer.pretrain import PretrainResult, pretrain

__all__ = ["main", "pretrain_in_subprocess"]

logger = logging.getLogger(__name__)


def pretrain_in_subprocess(
    cutouts_url: str,
    run_dir: str,
    pretrain: PretrainConfig,
    augment: AugmentConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    resume: bool = True,
) -> PretrainResult:
    """Run :func:`lensminer.pretrain.pretrain` in a new Python process and return its result.

    The child inherits this process's environment, standard output and standard error, so its
    progress and errors appear where this program's do. The arguments travel in a JSON file that
    only the current user can read, because ``storage_options`` may contain credentials. The file
    is deleted when the child exits.

    Parameters
    ----------
    cutouts_url, run_dir, pretrain, augment, storage_options, resume
        As for :func:`lensminer.pretrain.pretrain`.

    Returns
    -------
    PretrainResult
        The result of rank 0.

    Raises
    ------
    LensMinerError
        The error the child raised on purpose, of the same class (e.g. ``ConfigError``).
    PretrainError
        If the child exits with a non-zero status for another reason, or without writing its
        result.
    """
    request = {
        "cutouts_url": cutouts_url,
        "run_dir": run_dir,
        "pretrain": pretrain.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
        "storage_options": storage_options,
        "resume": resume,
    }

    with tempfile.TemporaryDirectory(prefix="lensminer-pretrain-") as folder:
        request_path = Path(folder) / "request.json"
        result_path = Path(folder) / "result.json"
        descriptor = os.open(request_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(request, file)

        command = [sys.executable, "-m", __name__, str(request_path), str(result_path)]
        logger.debug("starting the pretraining process for %s: %s", run_dir, command)
        status = subprocess.run(command, check=False).returncode
        outcome = json.loads(result_path.read_text()) if result_path.exists() else None

        # An error the child raised on purpose comes back as the same exception class.
        if outcome is not None and "error" in outcome:
            error_class = getattr(exceptions, outcome["error"]["type"], PretrainError)
            raise error_class(outcome["error"]["message"])
        if status != 0:
            raise PretrainError(
                f"the pretraining process for {run_dir} exited with status {status}. Its error "
                "is printed above. Fix the cause and rerun, and training resumes from the last "
                "checkpoint"
            )
        if outcome is None:
            raise PretrainError(
                f"the pretraining process for {run_dir} exited without writing its result"
            )
        return PretrainResult(**outcome)


def main(argv: list[str] | None = None) -> int:
    """Run the pretraining described by a request file and write rank 0's result.

    Parameters
    ----------
    argv
        ``[REQUEST, RESULT]``: the JSON request written by :func:`pretrain_in_subprocess` and the
        path to write the result to. Defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0, or 1 after a :class:`~lensminer.exceptions.LensMinerError`, which is
        logged and written to RESULT for the parent to raise again.
    """
    request_path, result_path = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    request = json.loads(Path(request_path).read_text())

    try:
        result = pretrain(
            request["cutouts_url"],
            request["run_dir"],
            PretrainConfig.model_validate(request["pretrain"]),
            AugmentConfig.model_validate(request["augment"]),
            storage_options=request["storage_options"],
            resume=request["resume"],
        )
    except LensMinerError as error:
        # Expected failures (settings, stores, checkpoints) go back to the parent to raise.
        logger.error("%s", error)
        _write_result(result_path, {"error": {"type": type(error).__name__, "message": str(error)}})
        return 1

    # Every rank returns a result, and rank 0's is written.
    if rank_zero_only.rank == 0:
        _write_result(result_path, asdict(result))
    return 0


def _write_result(path: str, outcome: dict[str, Any]) -> None:
    """Write ``outcome`` as JSON by rename, so that the file is whole or absent."""
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps(outcome))
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
