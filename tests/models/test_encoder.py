"""Tests of the encoder and its export to local files and S3."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.exceptions import CheckpointError
from lensminer.models.encoder import build_encoder, export_encoder, load_encoder

CONFIG = PretrainConfig(backbone="resnet18", projection_dim=16)


def _encoder(seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder(CONFIG)


def test_forward_shapes_and_norm() -> None:
    encoder = _encoder().eval()
    with torch.no_grad():
        representation, projection = encoder(torch.rand(3, 3, 96, 96))
    assert representation.shape == (3, 512)
    assert projection.shape == (3, 16)
    torch.testing.assert_close(projection.norm(dim=1), torch.ones(3))


def test_encoder_attributes() -> None:
    encoder = build_encoder(PretrainConfig(backbone="resnet50", projection_dim=128))
    assert encoder.representation_dim == 2048
    assert encoder.projection_dim == 128
    assert encoder.input_size == 96
    assert encoder.projector[0].in_features == 2048
    assert encoder.projector[2].out_features == 128


def test_export_load_round_trip(tmp_path: Path) -> None:
    encoder = _encoder().eval()
    augment = AugmentConfig(rgb_q=15.0)
    url = str(tmp_path / "run" / "encoder.pt")

    assert (
        export_encoder(encoder, url, config=CONFIG, augment=augment, extra={"loss": [1.0, 0.5]})
        == url
    )
    loaded = load_encoder(url)

    assert not loaded.training
    assert loaded.pretrain_config == CONFIG
    assert loaded.augment_config == augment
    assert loaded.metadata["extra"] == {"loss": [1.0, 0.5]}
    assert loaded.metadata["created"]
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        for expected, found in zip(encoder(x), loaded(x), strict=True):
            torch.testing.assert_close(found, expected, rtol=0, atol=0)


def test_export_leaves_no_partial_file(tmp_path: Path) -> None:
    url = str(tmp_path / "encoder.pt")
    export_encoder(_encoder(), url, config=CONFIG, augment=AugmentConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt"]


def test_export_is_weights_only_loadable(tmp_path: Path) -> None:
    url = tmp_path / "encoder.pt"
    export_encoder(_encoder(), str(url), config=CONFIG, augment=AugmentConfig())
    payload = torch.load(url, weights_only=True)
    assert payload["format"] == "lensminer-encoder"
    assert payload["pretrain"]["backbone"] == "resnet18"


def test_round_trip_on_s3(s3_endpoint: dict) -> None:
    encoder = _encoder().eval()
    url = "s3://lensminer-test/encoder-test/encoder.pt"
    export_encoder(
        encoder, url, config=CONFIG, augment=AugmentConfig(), storage_options=s3_endpoint
    )
    loaded = load_encoder(url, storage_options=s3_endpoint)
    torch.testing.assert_close(loaded.backbone.conv1.weight, encoder.backbone.conv1.weight)


def test_load_missing_file(tmp_path: Path) -> None:
    url = str(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="absent.pt.*not found"):
        load_encoder(url)


def test_load_truncated_file(tmp_path: Path) -> None:
    url = tmp_path / "encoder.pt"
    export_encoder(_encoder(), str(url), config=CONFIG, augment=AugmentConfig())
    url.write_bytes(url.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_encoder(str(url))


def test_load_rejects_pickled_code(tmp_path: Path) -> None:
    # weights_only loading must refuse arbitrary objects instead of unpickling them.
    url = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"format": "lensminer-encoder", "payload": Path("x")}, buffer)
    url.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="corrupt"):
        load_encoder(str(url))


def test_load_other_torch_file(tmp_path: Path) -> None:
    url = tmp_path / "weights.pt"
    torch.save(_encoder().state_dict(), url)
    with pytest.raises(CheckpointError, match="not a LensMiner encoder"):
        load_encoder(str(url))


def test_load_future_format_version(tmp_path: Path) -> None:
    url = tmp_path / "encoder.pt"
    export_encoder(_encoder(), str(url), config=CONFIG, augment=AugmentConfig())
    payload = torch.load(url, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, url)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_encoder(str(url))


def test_load_mismatched_weights(tmp_path: Path) -> None:
    url = tmp_path / "encoder.pt"
    export_encoder(_encoder(), str(url), config=CONFIG, augment=AugmentConfig())
    payload = torch.load(url, weights_only=True)
    payload["pretrain"]["backbone"] = "resnet34"
    torch.save(payload, url)
    with pytest.raises(CheckpointError, match="do not fit a resnet34"):
        load_encoder(str(url))
