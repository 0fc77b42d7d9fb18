"""Tests of the plain-torch ResNet against torchvision's parameter layout."""

from __future__ import annotations

import pytest
import torch

from lensminer.exceptions import ConfigError
from lensminer.models.resnet import resnet


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (channels,)),
        (f"{prefix}.bias", (channels,)),
        (f"{prefix}.running_mean", (channels,)),
        (f"{prefix}.running_var", (channels,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def _basic(prefix: str, cin: int, cout: int, downsample: bool) -> list[tuple[str, tuple[int, ...]]]:
    entries = [(f"{prefix}.conv1.weight", (cout, cin, 3, 3)), *_bn(f"{prefix}.bn1", cout)]
    entries += [(f"{prefix}.conv2.weight", (cout, cout, 3, 3)), *_bn(f"{prefix}.bn2", cout)]
    if downsample:
        entries += [
            (f"{prefix}.downsample.0.weight", (cout, cin, 1, 1)),
            *_bn(f"{prefix}.downsample.1", cout),
        ]
    return entries


# torchvision resnet18().state_dict() in order: 122 entries, 11,689,512 parameters.
RESNET18_REFERENCE = [
    ("conv1.weight", (64, 3, 7, 7)),
    *_bn("bn1", 64),
    *_basic("layer1.0", 64, 64, False),
    *_basic("layer1.1", 64, 64, False),
    *_basic("layer2.0", 64, 128, True),
    *_basic("layer2.1", 128, 128, False),
    *_basic("layer3.0", 128, 256, True),
    *_basic("layer3.1", 256, 256, False),
    *_basic("layer4.0", 256, 512, True),
    *_basic("layer4.1", 512, 512, False),
    ("fc.weight", (1000, 512)),
    ("fc.bias", (1000,)),
]


def test_resnet18_state_dict_layout() -> None:
    model = resnet("resnet18", small_stem=False, num_classes=1000)
    found = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert len(RESNET18_REFERENCE) == 122
    assert found == RESNET18_REFERENCE


@pytest.mark.parametrize(
    ("name", "entries", "parameters"),
    [("resnet18", 122, 11_689_512), ("resnet34", 218, 21_797_672), ("resnet50", 320, 25_557_032)],
)
def test_resnet_sizes_match_torchvision(name: str, entries: int, parameters: int) -> None:
    model = resnet(name, small_stem=False, num_classes=1000)
    assert len(model.state_dict()) == entries
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_resnet50_bottleneck_names() -> None:
    keys = set(resnet("resnet50", small_stem=True).state_dict())
    for key in (
        "layer1.0.conv3.weight",
        "layer1.0.bn3.running_var",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.bias",
    ):
        assert key in keys
    assert not any(key.startswith("fc.") for key in keys)


def test_state_dict_round_trip_with_fc_dropped() -> None:
    torch.manual_seed(0)
    source = resnet("resnet18", small_stem=False, num_classes=1000)
    trunk = resnet("resnet18", small_stem=True)
    weights = {
        key: value for key, value in source.state_dict().items() if not key.startswith("fc.")
    }
    trunk.load_state_dict(weights, strict=True)
    assert torch.equal(trunk.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize(("name", "width"), [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("small_stem", [True, False])
def test_trunk_output_width(name: str, width: int, small_stem: bool) -> None:
    torch.manual_seed(0)
    model = resnet(name, small_stem=small_stem).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 96))
    assert out.shape == (2, width)
    assert model.out_features == width


def test_small_stem_keeps_resolution() -> None:
    # Full stem: 96 -> 48 (conv1) -> 24 (max-pool) -> 3 at layer4; small stem: 96 -> 12.
    seen: dict[str, tuple[int, ...]] = {}
    for small_stem in (True, False):
        model = resnet("resnet18", small_stem=small_stem).eval()
        model.layer4.register_forward_hook(
            lambda _m, _i, out, s=small_stem: seen.__setitem__(str(s), tuple(out.shape))
        )
        with torch.no_grad():
            model(torch.rand(1, 3, 96, 96))
    assert seen["True"] == (1, 512, 12, 12)
    assert seen["False"] == (1, 512, 3, 3)


def test_zero_init_residual_makes_blocks_identity_branches() -> None:
    model = resnet("resnet50", small_stem=True, zero_init_residual=True)
    assert torch.count_nonzero(model.layer2[1].bn3.weight) == 0


def test_unknown_backbone_rejected() -> None:
    with pytest.raises(ConfigError, match="resnet101"):
        resnet("resnet101", small_stem=True)
