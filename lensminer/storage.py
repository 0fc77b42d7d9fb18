"""fsspec URLs and Zarr groups, the same way for local paths and object storage."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import fsspec
import zarr
from fsspec.core import url_to_fs

from lensminer.exceptions import StoreNotFoundError

__all__ = [
    "exists",
    "filesystem",
    "is_remote",
    "join_url",
    "open_file",
    "open_group",
    "read_json",
    "write_json",
]

logger = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    """Return True when ``url`` has a protocol other than the local file system."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return protocol not in ("file", "local")


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto an fsspec URL with single slashes."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec file system and the protocol-free path of ``url``."""
    return url_to_fs(url, **(storage_options or {}))


def open_file(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> Any:
    """Open a file at a local path or fsspec URL; ``storage_options`` apply to remote URLs only."""
    return fsspec.open(url, mode, **(storage_options if is_remote(url) and storage_options else {}))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Return True when a file or directory exists at ``url``."""
    fs, path = filesystem(url, storage_options)
    return bool(fs.exists(path))


def open_group(
    url: str,
    mode: Literal["r", "r+", "a", "w", "w-"] = "r",
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Open a Zarr v3 group at a local path or fsspec URL.

    Raises
    ------
    StoreNotFoundError
        If ``mode`` is ``"r"`` or ``"r+"`` and no group exists at ``url``.
    """
    options = storage_options if is_remote(url) else None
    logger.debug("opening Zarr group %s (mode=%s)", url, mode)
    try:
        return zarr.open_group(url, mode=mode, storage_options=options, zarr_format=3)
    except FileNotFoundError as error:
        raise StoreNotFoundError(
            f"no Zarr store at {url!r}; run the stage that writes it first, or check the URL"
        ) from error


def write_json(url: str, value: Any, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``value`` as indented JSON to ``url`` and return the URL."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "w") as handle:
        json.dump(value, handle, indent=2, default=str)
    return url


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Read a JSON document from ``url``."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "r") as handle:
        return json.load(handle)
