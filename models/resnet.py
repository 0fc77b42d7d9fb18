"""ResNet-18/34/50 backbones written in plain torch.

Module and parameter names follow torchvision's ``torchvision.models.resnet`` (v0.15 and later:
``conv1``, ``bn1``, ``layer1`` ... ``layer4``, blocks with ``conv1``/``bn1``/``conv2``/``bn2``
(``conv3``/``bn3`` in bottlenecks) and ``downsample.0``/``downsample.1``, ``fc``), so a torchvision
state_dict loads into these modules. torchvision itself does not import beside the CPU torch build
that LensMiner uses, which is why the architecture lives here.

The bottleneck puts its stride on the 3x3 convolution (ResNet v1.5), as torchvision does.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from lensminer.exceptions import ConfigError

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "RESNET_LAYERS", "resnet"]

logger = logging.getLogger(__name__)

ResNetName = Literal["resnet18", "resnet34", "resnet50"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with an identity or projection shortcut."""

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


# Block type and blocks per stage, as in He et al. 2016, Table 1.
RESNET_LAYERS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet trunk with an optional classification layer.

    Parameters
    ----------
    block
        :class:`BasicBlock` or :class:`Bottleneck`.
    layers
        Number of blocks in each of the four stages.
    small_stem
        If True, ``conv1`` has stride 1 and the max-pool is an identity, so a 96 px input reaches
        ``layer4`` at 12 px instead of 3 px. ``conv1`` keeps its 7x7 kernel, so the parameter
        shapes (and torchvision state_dicts) are the same either way.
    num_classes
        Width of ``fc``. ``None`` drops ``fc`` and :meth:`forward` returns the pooled features.
    in_channels
        Input channels of ``conv1``.
    zero_init_residual
        Start each block's last BatchNorm at zero scale, so every residual branch starts as the
        identity (Goyal et al. 2017).

    Attributes
    ----------
    out_features
        Width D of the pooled features: 512 (BasicBlock) or 2048 (Bottleneck).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        small_stem: bool = False,
        num_classes: int | None = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.small_stem = small_stem
        self._channels = 64

        # Stem
        self.conv1 = nn.Conv2d(
            in_channels, 64, kernel_size=7, stride=1 if small_stem else 2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )

        # Four stages. Every stage after the first halves the resolution in its first block.
        self.layer1 = self._make_stage(block, 64, layers[0], stride=1)
        self.layer2 = self._make_stage(block, 128, layers[1], stride=2)
        self.layer3 = self._make_stage(block, 256, layers[2], stride=2)
        self.layer4 = self._make_stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_features = 512 * block.expansion
        self.fc: nn.Module | None = (
            None if num_classes is None else nn.Linear(self.out_features, num_classes)
        )

        self._init_weights(zero_init_residual)

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], width: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._channels != width * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._channels, width * block.expansion, stride),
                nn.BatchNorm2d(width * block.expansion),
            )

        stage = [block(self._channels, width, stride, downsample)]
        self._channels = width * block.expansion
        stage += [block(self._channels, width) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Compute pooled features.

        Parameters
        ----------
        x
            Images, shape (B, in_channels, H, W), float.

        Returns
        -------
        Tensor
            Shape (B, out_features), the global average of ``layer4``'s output.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Compute pooled features (B, out_features), or logits (B, num_classes) with ``fc``."""
        features = self.forward_features(x)
        return features if self.fc is None else self.fc(features)


def resnet(
    name: str,
    small_stem: bool,
    *,
    num_classes: int | None = None,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build a randomly initialised ResNet trunk.

    Parameters
    ----------
    name
        ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
    small_stem
        Stride-1 ``conv1`` and no max-pool, suited to 96 px cutouts.
    num_classes
        ``None`` (default) builds the trunk without ``fc``, whose output is the pooled features of
        width 512 (ResNet-18/34) or 2048 (ResNet-50). An integer adds ``fc`` as in torchvision.

    Raises
    ------
    ConfigError
        If ``name`` is not one of the supported architectures.
    """
    if name not in RESNET_LAYERS:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {sorted(RESNET_LAYERS)}")

    block, layers = RESNET_LAYERS[name]
    model = ResNet(
        block,
        layers,
        small_stem=small_stem,
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )
    logger.debug(
        "built %s (small_stem=%s, %d parameters)",
        name,
        small_stem,
        sum(p.numel() for p in model.parameters()),
    )
    return model
