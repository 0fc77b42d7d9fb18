"""The image encoder (ResNet backbone + MoCo projection head) and its single-file export.

An exported encoder is one ``torch.save`` file that contains plain data only (tensors, strings,
numbers, lists, dicts), so :func:`load_encoder` reads it with ``torch.load(weights_only=True)``
and never runs pickled code from the file.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import pickle
import subprocess
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from lensminer import storage
from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.exceptions import CheckpointError
from lensminer.models.resnet import resnet

__all__ = [
    "ENCODER_FORMAT",
    "ENCODER_FORMAT_VERSION",
    "Encoder",
    "build_encoder",
    "export_encoder",
    "load_encoder",
]

logger = logging.getLogger(__name__)

ENCODER_FORMAT = "lensminer-encoder"
ENCODER_FORMAT_VERSION = 1


class Encoder(nn.Module):
    """ResNet backbone followed by the MoCo v2 projection head D -> D -> ReLU -> P.

    Parameters
    ----------
    backbone
        Backbone name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
    small_stem
        Stride-1 ``conv1`` and no max-pool (see :func:`lensminer.models.resnet.resnet`).
    projection_dim
        Width P of the projection.
    input_size
        Side in pixels of the square inputs the encoder was trained on.

    Attributes
    ----------
    representation_dim
        Width D of the representation: 512 for ResNet-18/34, 2048 for ResNet-50.
    projection_dim
        Width P of the L2-normalised projection.
    input_size
        Expected input side in pixels (96 by default).
    pretrain_config, augment_config
        The configurations the encoder was trained with; set by :func:`load_encoder`, else None.
    metadata
        Provenance read from an exported file (version, git commit, creation time, extra).
    """

    def __init__(
        self, backbone: str, *, small_stem: bool, projection_dim: int, input_size: int = 96
    ) -> None:
        super().__init__()
        self.backbone = resnet(backbone, small_stem)
        self.representation_dim: int = self.backbone.out_features
        self.projection_dim = projection_dim
        self.input_size = input_size
        self.projector = nn.Sequential(
            nn.Linear(self.representation_dim, self.representation_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.representation_dim, projection_dim),
        )
        self.pretrain_config: PretrainConfig | None = None
        self.augment_config: AugmentConfig | None = None
        self.metadata: dict[str, Any] = {}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Embed a batch of RGB views.

        Parameters
        ----------
        x
            Images, shape (B, 3, H, W), float32 in [0, 1] (see
            :func:`lensminer.augment.evaluation_view`). H = W = ``input_size`` for the embeddings
            the encoder was trained to produce; other sizes run but are out of distribution.

        Returns
        -------
        representation
            Shape (B, D), the backbone's pooled features.
        projection
            Shape (B, P), L2-normalised along dim 1.
        """
        representation = self.backbone(x)
        projection = F.normalize(self.projector(representation), dim=1)
        return representation, projection


def build_encoder(config: PretrainConfig, *, input_size: int = 96) -> Encoder:
    """Build a randomly initialised :class:`Encoder` from a pretraining configuration."""
    return Encoder(
        config.backbone,
        small_stem=config.small_stem,
        projection_dim=config.projection_dim,
        input_size=input_size,
    )


def _package_version() -> str:
    try:
        return metadata.version("lensminer")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    """Return the commit of the source checkout this module runs from, or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def export_encoder(
    encoder: Encoder,
    url: str,
    *,
    config: PretrainConfig,
    augment: AugmentConfig,
    extra: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write an encoder with its configuration and provenance to one file.

    The file is a ``torch.save`` dict with the keys ``format``, ``format_version``,
    ``state_dict`` (CPU tensors), ``pretrain`` and ``augment`` (configuration dicts),
    ``input_size``, ``lensminer_version``, ``git_commit`` (None outside a git checkout),
    ``created`` (ISO 8601, UTC) and ``extra``.

    Parameters
    ----------
    encoder
        The encoder to save, on any device.
    url
        fsspec URL of the file, e.g. ``runs/a/encoder.pt`` or ``s3://bucket/runs/a/encoder.pt``.
    config, augment
        The configurations the encoder was trained with; :func:`load_encoder` rebuilds the
        architecture from ``config``.
    extra
        Further plain values to keep (numbers, strings, lists, dicts), e.g. training metrics.

    Returns
    -------
    str
        ``url``.
    """
    payload = {
        "format": ENCODER_FORMAT,
        "format_version": ENCODER_FORMAT_VERSION,
        "state_dict": {key: value.detach().cpu() for key, value in encoder.state_dict().items()},
        "pretrain": config.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
        "input_size": encoder.input_size,
        "lensminer_version": _package_version(),
        "git_commit": _git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)

    # Write a temporary file and move it into place, so a reader never sees a partial file.
    fs, path = storage.filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not storage.is_remote(url):
        fs.makedirs(parent, exist_ok=True)
    temporary = f"{path}.partial"
    fs.pipe_file(temporary, buffer.getvalue())
    fs.mv(temporary, path)
    logger.debug("exported encoder to %s (%d bytes)", url, buffer.tell())
    return url


def load_encoder(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> Encoder:
    """Rebuild an encoder written by :func:`export_encoder`, in eval mode.

    Parameters
    ----------
    url
        fsspec URL of the exported file.
    map_location
        Device for the weights.

    Returns
    -------
    Encoder
        With ``pretrain_config``, ``augment_config`` and ``metadata`` set from the file.

    Raises
    ------
    CheckpointError
        If the file is missing, is not a readable torch file, is not a LensMiner encoder of a
        supported format version, or its weights do not fit the architecture it names.
    """
    fs, path = storage.filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as error:
        raise CheckpointError(
            f"encoder file {url!r} not found; run pretraining or check the URL"
        ) from error

    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
    ) as error:
        raise CheckpointError(
            f"encoder file {url!r} is corrupt or not a torch file ({error}); "
            "export the encoder again"
        ) from error

    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise CheckpointError(
            f"{url!r} is not a LensMiner encoder file; expected one written by export_encoder"
        )
    version = payload.get("format_version")
    if version != ENCODER_FORMAT_VERSION:
        raise CheckpointError(
            f"encoder file {url!r} has format version {version!r}, but this LensMiner reads "
            f"version {ENCODER_FORMAT_VERSION}; export it again with this version"
        )

    try:
        pretrain = PretrainConfig.model_validate(payload["pretrain"])
        augment = AugmentConfig.model_validate(payload["augment"])
    except (KeyError, ValidationError) as error:
        raise CheckpointError(
            f"encoder file {url!r} has an invalid configuration: {error}"
        ) from error

    encoder = build_encoder(pretrain, input_size=int(payload.get("input_size", 96)))
    try:
        encoder.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"weights in {url!r} do not fit a {pretrain.backbone} encoder "
            f"(small_stem={pretrain.small_stem}, projection_dim={pretrain.projection_dim}): {error}"
        ) from error

    encoder.pretrain_config = pretrain
    encoder.augment_config = augment
    encoder.metadata = {
        key: payload.get(key) for key in ("lensminer_version", "git_commit", "created", "extra")
    }
    encoder.to(map_location).eval()
    logger.debug("loaded %s encoder from %s", pretrain.backbone, url)
    return encoder
