"""Backbones: ImageNet classifiers cut into feature extractors at strides 8, 16 and 32.

Every backbone is a `Backbone`: `forward(x)` returns `{8: f8, 16: f16, 32: f32}`,
`channels[s]` is the channel count of `f_s`, and `offsets[s]` says where its features
sit on the input: feature index `i` (along either axis) is centred on input pixel
`s * i + offsets[s]`. The FCN head derives its upsampling kernels and crop offsets from
these numbers, so a new backbone only has to declare them correctly.

Parameter and buffer names equal torchvision's, so torchvision's ImageNet state dicts
load directly; the fully connected layers that FCN keeps (VGG16's fc6/fc7,
MobileNetV3's 960->1280 layer) are 1x1 or 7x7 convolutions here and their weights are
reshaped on load, as in the paper's "convolutionalization". The final 1000-way layer
is discarded.

Pretrained weights are read from the torch hub cache or from a given file, never
downloaded: this project runs offline, and a download would hang.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tv

from seg.errors import CheckpointError, ConfigError, WeightsNotFoundError


class Backbone(nn.Module):
    """Maps an image batch to feature maps at strides 8, 16 and 32.

    Subclasses set `name`, `channels` and `offsets` (see the module docstring) and
    `replicate_border`: True when the FCN head should extend its coarse score maps by
    one replicated row/column at the bottom/right before upsampling, so that the last
    input pixels are interpolated rather than faded towards zero (a "same"-padded
    network's last feature centre can sit up to stride-1 pixels before the image end).
    """

    name: str
    channels: dict[int, int]
    offsets: dict[int, float]
    replicate_border: bool = True

    def forward(self, x: Tensor) -> dict[int, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_torchvision_state_dict(self, state: Mapping[str, Tensor], source: str) -> None:
        """Loads a torchvision classifier's state dict (keys as torchvision names them).

        Every parameter and buffer of this backbone must be in `state` with the same
        number of elements (fully connected weights are reshaped into convolutions);
        keys this backbone does not have (the final classifier) are ignored. A file that
        does not fit raises CheckpointError naming `source`.
        """
        own = self.state_dict()
        # Files saved before BatchNorm counted its batches lack num_batches_tracked;
        # BatchNorm's own loader fills it in.
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
                      for k, v in own.items() if k in state and state[k].numel() != v.numel()]
        if missing or mismatched:
            raise CheckpointError(
                f"{source} is not a torchvision {self.name} state dict: "
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"mismatched shapes {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}")
        self.load_state_dict({k: state[k].reshape(v.shape) for k, v in own.items() if k in state},
                             strict=False)


class _TappedBackbone(Backbone):
    """A `features` sequence tapped at two indices (`_taps`: index -> stride 8, 16),
    then a `classifier` (the convolutionalized fully connected layers) at stride 32."""

    features: nn.Sequential
    classifier: nn.Sequential
    _taps: dict[int, int]

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                out[self._taps[index]] = x
        out[32] = self.classifier(x)
        return out


# ---------------------------------------------------------------------------- VGG16

# torchvision's VGG16 "D" layout; the indices of `features` match torchvision's so
# its state dict loads as is.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Backbone(_TappedBackbone):
    """VGG16 as in the Caffe FCN: conv1_1 padded by 100, ceil-mode pooling, fc6 as a
    7x7 convolution (4096), fc7 as a 1x1 convolution (4096), each with ReLU and dropout.

    The 100-pixel padding makes the output of the unpadded 7x7 fc6 cover any input, and
    the FCN head crops back to the image with the Caffe model's offsets (19 for FCN-32s;
    5 and 27 for FCN-16s; 5, 9 and 31 for FCN-8s), derived here from `offsets`.
    """

    name = "vgg16"
    channels = {8: 256, 16: 512, 32: 4096}
    # Coordinate maps (Caffe's coord_map): conv1_1 pad 100 moves the origin to -99, each
    # 2x2 pool maps index i to the centre 2i + 0.5 of its window, fc6's 7x7 window is
    # centred 3 pool5 cells in: pool3 -> 8i - 95.5, pool4 -> 16i - 91.5, fc7 -> 32i + 12.5.
    offsets = {8: -95.5, 16: -91.5, 32: 12.5}
    replicate_border = False  # keep the Caffe model's alignment exactly

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                # Caffe pools round up; the crop offsets above assume it.
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=100 if not layers else 1),
                           nn.ReLU(inplace=True)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        # Named like torchvision's classifier (0 = fc6, 3 = fc7) so its weights load;
        # elementwise dropout as in Caffe (not Dropout2d).
        self.classifier = nn.Sequential(
            nn.Conv2d(512, 4096, 7), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Conv2d(4096, 4096, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),
        )
        self._taps = {16: 8, 23: 16}  # features index of pool3, pool4 -> stride
        # torchvision's VGG initialisation (its fully connected layers: N(0, 0.01)).
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in self.classifier.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- ResNet

class ResNetBackbone(Backbone):
    """torchvision ResNet without avgpool/fc: layer2, layer3, layer4 at strides 8, 16, 32.

    Every strided layer is "same"-padded and symmetric (7x7 pad 3, 3x3 pad 1, 1x1 pad 0),
    so feature i at stride s is centred on input pixel s * i: all offsets are 0.
    """

    offsets = {8: 0.0, 16: 0.0, 32: 0.0}

    def __init__(self, net: tv.ResNet, name: str) -> None:
        super().__init__()
        self.name = name
        # Attribute names as in torchvision, so its state dict keys match ours.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = net.fc.in_features  # 512 (basic blocks) or 2048 (bottlenecks)
        self.channels = {8: width // 4, 16: width // 2, 32: width}

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        return {8: f8, 16: f16, 32: f32}


# ---------------------------------------------------------------------- MobileNetV3

class MobileNetV3Backbone(_TappedBackbone):
    """torchvision MobileNetV3-Large; its hidden fully connected layer (960 -> 1280,
    Hardswish, dropout 0.2) becomes a 1x1 convolution, as FCN does with VGG's fc6/fc7.

    Strided convolutions are "same"-padded and symmetric (3x3 pad 1, 5x5 pad 2), so all
    offsets are 0. Stride 8 ends at features[6], 16 at features[12], 32 at the end.
    """

    name = "mobilenet_v3_large"
    offsets = {8: 0.0, 16: 0.0, 32: 0.0}

    def __init__(self, net: tv.MobileNetV3) -> None:
        super().__init__()
        self.features = net.features
        hidden: nn.Linear = net.classifier[0]
        # Index 0 as in torchvision's classifier, so `classifier.0.*` loads.
        self.classifier = nn.Sequential(
            nn.Conv2d(hidden.in_features, hidden.out_features, 1),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2),
        )
        with torch.no_grad():
            self.classifier[0].weight.copy_(hidden.weight[:, :, None, None])
            self.classifier[0].bias.copy_(hidden.bias)
        self.channels = {8: self.features[6].out_channels, 16: self.features[12].out_channels,
                         32: hidden.out_features}
        self._taps = {6: 8, 12: 16}


# ------------------------------------------------------------------ weights and registry

# torchvision's ImageNet weights per backbone (the enum's DEFAULT); its url names the
# file torchvision caches under torch.hub.get_dir()/checkpoints/.
_IMAGENET_WEIGHTS: dict[str, tv.WeightsEnum] = {
    "vgg16": tv.VGG16_Weights.IMAGENET1K_V1,
    "resnet18": tv.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": tv.ResNet50_Weights.IMAGENET1K_V2,
    "mobilenet_v3_large": tv.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
}


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's ImageNet weights for backbone `name` are cached:
    `torch.hub.get_dir()/checkpoints/<file name from the weights url>`."""
    if name not in _IMAGENET_WEIGHTS:
        raise ConfigError(f"no torchvision ImageNet weights are known for backbone {name!r}; "
                          "set model.weights=/path/to/state_dict.pth instead")
    url = _IMAGENET_WEIGHTS[name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Reads a state dict with `weights_only=True`; a missing file raises
    WeightsNotFoundError, an unreadable or non-state-dict file CheckpointError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"backbone weights file {path} does not exist; "
                                   "set model.weights to an existing state dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types (pickle, zip, unsafe globals)
        raise CheckpointError(f"cannot read backbone weights {path}: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _pretrained_state(name: str, pretrained: bool, weights: str | Path | None) -> tuple[dict[str, Tensor], str] | None:
    """The state dict to load into backbone `name` and where it came from, or None for
    random initialisation. A given `weights` file implies pretrained."""
    if weights is not None:
        return load_state_dict_file(weights), str(weights)
    if not pretrained:
        return None
    path = imagenet_weights_path(name)
    if not path.is_file():
        url = _IMAGENET_WEIGHTS[name].url
        raise WeightsNotFoundError(
            f"pretrained {name} weights not found at {path}. This project never downloads: "
            f"put torchvision's ImageNet file {path.name} ({url}) at {path}, "
            f"or set model.weights=/path/to/{name}_state_dict.pth, or model.pretrained=false")
    return load_state_dict_file(path), str(path)


def _build(name: str, make: Callable[[], Backbone], pretrained: bool, weights: str | Path | None) -> Backbone:
    # Weights are found (or refused) before the network is built: building VGG16 costs
    # a second, and a missing file should fail fast.
    state = _pretrained_state(name, pretrained, weights)
    backbone = make()
    if state is not None:
        backbone.load_torchvision_state_dict(*state)
    return backbone


def vgg16(pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """VGG16 (Caffe FCN variant, see VGG16Backbone) at strides 8/16/32 with 256/512/4096 channels."""
    return _build("vgg16", VGG16Backbone, pretrained, weights)


def resnet18(pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """ResNet-18 at strides 8/16/32 with 128/256/512 channels."""
    return _build("resnet18", lambda: ResNetBackbone(tv.resnet18(weights=None), "resnet18"), pretrained, weights)


def resnet50(pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """ResNet-50 at strides 8/16/32 with 512/1024/2048 channels."""
    return _build("resnet50", lambda: ResNetBackbone(tv.resnet50(weights=None), "resnet50"), pretrained, weights)


def mobilenet_v3_large(pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """MobileNetV3-Large at strides 8/16/32 with 40/112/1280 channels."""
    return _build("mobilenet_v3_large", lambda: MobileNetV3Backbone(tv.mobilenet_v3_large(weights=None)),
                  pretrained, weights)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v3_large": mobilenet_v3_large,
}


def build_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """The backbone registered as `name`; an unknown name raises ConfigError listing the valid ones."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](pretrained=pretrained, weights=weights)
