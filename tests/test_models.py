"""FCN models: shapes for any input size, alignment, the paper's initialisation and
parameter counts, the registries, and offline pretrained weights.

Tests run over the whole registry (MODELS x BACKBONES). VGG16 (134M parameters, input
padded by 100) dominates the cost, so models are built once per module and inputs are
tiny; parameter counts use the meta device (no memory, no initialisation cost).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from seg.config import ModelConfig
from seg.errors import CheckpointError, ConfigError, WeightsNotFoundError
from seg.models import BACKBONES, FCN, MODELS, build_model, build_model_from_config

NUM_CLASSES = 3
GRID = list(itertools.product(MODELS, BACKBONES))
ODD_SIZES = [(33, 47), (64, 128), (97, 131)]


@pytest.fixture(scope="module")
def cached_model() -> Iterator[Callable[[str, str], nn.Module]]:
    """Builds each (arch, backbone) once, seeded, in eval mode. Tests that change a
    model must deepcopy it first."""
    cache: dict[tuple[str, str], nn.Module] = {}

    def get(arch: str, backbone: str) -> nn.Module:
        if (arch, backbone) not in cache:
            torch.manual_seed(0)
            cache[arch, backbone] = build_model(arch, NUM_CLASSES, backbone).eval()
        return cache[arch, backbone]

    yield get
    cache.clear()


def random_scores(model: FCN) -> FCN:
    """A copy of `model` whose score layers are random (at init they are zero, which
    makes every output 0 and hides alignment). Biases stay zero, so that the output is
    all features, no constant."""
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.score.values():
            layer.weight.normal_(0, layer.in_channels ** -0.5)
    return model


def assert_same_image(actual: Tensor, expected: Tensor) -> None:
    """Equal up to float rounding, relative to the spatial variation of `expected`
    (which must vary: a flat output would hide any misalignment)."""
    variation = (expected - expected.mean(dim=(-2, -1), keepdim=True)).abs().amax().item()
    assert variation > 1e-3 * expected.abs().amax().item() > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * variation)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("arch, backbone", GRID)
def test_output_has_input_size_for_odd_sizes(cached_model, arch: str, backbone: str) -> None:
    model = cached_model(arch, backbone)
    with torch.inference_mode():
        for height, width in ODD_SIZES:
            out = model(torch.randn(1, 3, height, width))
            assert out.shape == (1, NUM_CLASSES, height, width), (arch, backbone, height, width)


@pytest.mark.parametrize("arch, backbone", GRID)
def test_output_has_input_size_for_every_residue(cached_model, arch: str, backbone: str) -> None:
    # Heights 1..33 and widths 97..65 cover every residue modulo 32 (the largest stride)
    # and the smallest inputs. Big models (VGG16: 134M parameters, input padded by 100)
    # run on the meta device: shape inference only, no arithmetic.
    model = cached_model(arch, backbone)
    device = "meta" if sum(p.numel() for p in model.parameters()) > 50_000_000 else "cpu"
    if device == "meta":
        model = copy.deepcopy(model).to("meta")
    with torch.inference_mode():
        for height in range(1, 34):
            width = 98 - height
            out = model(torch.empty(1, 3, height, width, device=device).normal_())
            assert out.shape == (1, NUM_CLASSES, height, width), (height, width)


# ------------------------------------------------------------------------- alignment

def symmetric_width(model: FCN) -> int:
    """A width (about 100) for which the backbone's stride-32 feature centres are
    symmetric about the image centre: first centre at offset o, last at W - 1 - o."""
    return 96 + (1 + round(2 * model.backbone.offsets[32])) % 32


@pytest.mark.parametrize("arch, backbone", GRID)
def test_output_is_aligned_with_input_under_flips(cached_model, arch: str, backbone: str) -> None:
    # With left-right symmetric kernels everywhere, a correctly aligned network commutes
    # with a horizontal flip (for a width whose feature grid is symmetric). A crop off by
    # one pixel anywhere shifts the output and breaks this. Independent of the declared
    # offsets except for choosing the width.
    model = random_scores(cached_model(arch, backbone))
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
        x = torch.randn(1, 3, 9, symmetric_width(model))
        out = model(x)
        out_flipped = model(x.flip(-1)).flip(-1)
    assert_same_image(out_flipped, out)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shifting_input_by_32_shifts_output_by_32(cached_model, backbone: str) -> None:
    model = random_scores(cached_model("fcn8s", backbone))
    x = torch.randn(1, 3, 5, 640 + 32)
    with torch.no_grad():
        left, right = model(x[..., :640]), model(x[..., 32:])
    # Columns far from both borders (the receptive fields are ~400 pixels wide).
    # MobileNetV3's squeeze-excitation pools the whole image, so there the equality is
    # approximate (measured: 1.6e-5 of the output's variation, within the 1e-4 tolerance).
    assert_same_image(right[..., 224:352], left[..., 256:384])


def hook_scores(model: FCN, make: Callable[[int, Tensor], Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Replaces each score layer's output with `make(stride, output)`."""
    return [layer.register_forward_hook(lambda _m, _i, out, s=int(key): make(s, out))
            for key, layer in model.score.items()]


@pytest.mark.parametrize("arch, backbone", GRID)
def test_upsampled_scores_land_on_the_right_pixels(cached_model, arch: str, backbone: str) -> None:
    # Feed every stream a score map whose value is the input x-coordinate of its feature
    # centre (s * i + offset): where the upsampling interpolates (the constant map comes
    # out as the number of streams), output pixel x must read (number of streams) * x.
    model = cached_model(arch, backbone)
    offsets = model.backbone.offsets
    streams = len(model.score)
    # Square: nested upsamplings fade near the borders of VGG16's Caffe layout, so its
    # full-weight interior needs about 100 pixels in both directions.
    x = torch.randn(1, 3, symmetric_width(model), symmetric_width(model))

    def run(make: Callable[[int, Tensor], Tensor]) -> Tensor:
        handles = hook_scores(model, make)
        try:
            with torch.no_grad():
                return model(x)[0]
        finally:
            for handle in handles:
                handle.remove()

    ones = run(lambda s, out: torch.ones_like(out))
    ramp = run(lambda s, out: (s * torch.arange(out.shape[3]) + offsets[s]).expand_as(out).clone())
    full = (ones - streams).abs() < 1e-5
    columns = torch.arange(x.shape[3]).expand_as(ramp).float()
    assert full[:, x.shape[2] // 2, x.shape[3] // 2 - 16:x.shape[3] // 2 + 16].all()
    torch.testing.assert_close(ramp[full], streams * columns[full], rtol=0, atol=1e-3)
    if model.backbone.replicate_border:  # no fading at any border
        assert full.all()


# ----------------------------------------------------------------- paper's initialisation

def hand_bilinear_1d(size: int) -> list[float]:
    """The 1-D bilinear upsampling filter of Caffe's surgery.upsample_filt, written out."""
    factor = math.ceil(size / 2)
    centre = (size - 1) / 2
    return [1 - abs(i - centre) / factor for i in range(size)]


def test_hand_bilinear_reference_values() -> None:
    assert hand_bilinear_1d(4) == [0.25, 0.75, 0.75, 0.25]
    assert hand_bilinear_1d(3) == [0.5, 1.0, 0.5]


@pytest.mark.parametrize("arch, backbone", GRID)
def test_upsampling_is_bilinear_and_scores_zero_at_init(cached_model, arch: str, backbone: str) -> None:
    model = cached_model(arch, backbone)
    upsamplers = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(upsamplers) == len(model.score)  # one x2 per skip plus the final one
    for layer in upsamplers:
        size = layer.kernel_size[0]
        assert layer.kernel_size == (size, size) and layer.stride[0] in (size // 2, (size + 1) // 2)
        tent = torch.tensor(hand_bilinear_1d(size))
        expected = torch.zeros_like(layer.weight)
        for c in range(NUM_CLASSES):  # one kernel per class, no mixing of classes
            expected[c, c] = torch.outer(tent, tent)
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=0)
    for layer in model.score.values():
        assert not layer.weight.any() and not layer.bias.any()
    with torch.no_grad():
        assert not model(torch.randn(1, 3, 33, 47)).any()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_upsampling_layers_interpolate_bilinearly(cached_model, backbone: str) -> None:
    # Away from the borders, the transposed convolution must equal F.interpolate's
    # bilinear interpolation of any map (so also reproduce a smooth ramp exactly).
    model = cached_model("fcn8s", backbone)
    torch.manual_seed(2)
    coarse = torch.randn(1, NUM_CLASSES, 6, 7)
    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    ramp = (3 * yy - 2 * xx).expand(1, NUM_CLASSES, 6, 7)
    for layer in [*model.upsample.values(), model.final_upsample]:
        f, k = layer.stride[0], layer.kernel_size[0]
        for source in (coarse, ramp):
            with torch.no_grad():
                up = layer(source)
            if k % 2:  # odd kernel: output (k-1)/2 + f*i sits on coarse sample i
                start, size = (k - 1) // 2, (5 * f + 1, 6 * f + 1)
                expected = F.interpolate(source, size=size, mode="bilinear", align_corners=True)
            else:  # even kernel: output u sits at coarse (u + 1/2)/f - 1, half-pixel centres
                start = f
                full = F.interpolate(source, scale_factor=f, mode="bilinear", align_corners=False)
                expected = full[..., f // 2:5 * f + f // 2, f // 2:6 * f + f // 2]
                size = expected.shape[-2:]
            got = up[..., start:start + size[0], start:start + size[1]]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", MODELS)
def test_final_upsampling_fixed_and_x2_upsampling_learned(cached_model, arch: str) -> None:
    model = cached_model(arch, "resnet18")
    assert not model.final_upsample.weight.requires_grad
    assert all(layer.weight.requires_grad for layer in model.upsample.values())
    learnable = FCN(copy.deepcopy(model.backbone), NUM_CLASSES, model.skips, learn_final_upsample=True)
    assert learnable.final_upsample.weight.requires_grad


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_reach_the_backbone(cached_model, backbone: str) -> None:
    model = copy.deepcopy(cached_model("fcn8s", backbone)).train()
    x = torch.randn(1, 3, 33, 47)
    target = torch.randint(0, NUM_CLASSES, (1, 33, 47))
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))

    F.cross_entropy(model(x), target).backward()
    # Zero score layers pass no gradient down: the first step trains the scores only.
    assert all(layer.weight.grad.abs().sum() > 0 for layer in model.score.values())
    assert not first_conv.weight.grad.any()
    assert model.final_upsample.weight.grad is None

    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.zero_grad()
    F.cross_entropy(model(x), target).backward()
    assert first_conv.weight.grad.abs().sum() > 0
    assert all(layer.weight.grad.abs().sum() > 0 for layer in model.upsample.values())


# --------------------------------------------------------------------- VGG16 as in the paper

# Counts of the Caffe models (voc-fcn{32,16,8}s, = wkentaro/pytorch-fcn's), every blob
# included: VGG16 convs 14,714,688 + fc6 102,764,544 + fc7 16,781,312 + 1x1 score layers
# (4097, 513, 257 per class) + ConvTranspose kernels C*C*k*k (k = 64; 4, 32; 4, 4, 16).
# "trainable" leaves out the fixed final upsampling (lr_mult 0 in Caffe).
VGG16_COUNTS = {
    (21, "fcn32s"): (136_152_917, 134_346_581),
    (21, "fcn16s"): (134_815_994, 134_364_410),
    (21, "fcn8s"): (134_489_759, 134_376_863),
    (19, "fcn32s"): (135_817_043, 134_338_387),
    (19, "fcn16s"): (134_723_574, 134_353_910),
    (19, "fcn8s"): (134_456_985, 134_364_569),
}


@pytest.mark.parametrize("num_classes, arch", VGG16_COUNTS)
def test_vgg16_parameter_counts_match_the_caffe_models(num_classes: int, arch: str) -> None:
    with torch.device("meta"):
        model = build_model(arch, num_classes, "vgg16")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == VGG16_COUNTS[num_classes, arch]


@pytest.mark.parametrize("arch, crops", [("fcn32s", (19,)), ("fcn16s", (5, 27)), ("fcn8s", (5, 9, 31))])
def test_vgg16_crop_offsets_equal_the_caffe_models(arch: str, crops: tuple[int, ...]) -> None:
    with torch.device("meta"):
        model = build_model(arch, 21, "vgg16")
    assert model.crop_offsets == crops
    assert model.backbone.features[0].padding == (100, 100)
    assert [m.kernel_size for m in model.modules() if isinstance(m, nn.ConvTranspose2d)] == \
        {"fcn32s": [(64, 64)], "fcn16s": [(4, 4), (32, 32)], "fcn8s": [(4, 4), (4, 4), (16, 16)]}[arch]


def test_vgg16_fc6_fc7_are_convolutions_with_dropout() -> None:
    with torch.device("meta"):
        classifier = build_model("fcn32s", 21, "vgg16").backbone.classifier
    fc6, fc7 = classifier[0], classifier[3]
    assert (fc6.in_channels, fc6.out_channels, fc6.kernel_size, fc6.padding) == (512, 4096, (7, 7), (0, 0))
    assert (fc7.in_channels, fc7.out_channels, fc7.kernel_size) == (4096, 4096, (1, 1))
    assert isinstance(classifier[2], nn.Dropout) and isinstance(classifier[5], nn.Dropout)


def test_vgg16_loads_torchvision_weights_converting_fc6_fc7(tmp_path: Path) -> None:
    # torchvision's own keys and shapes (built on meta, no 138M initialisation), random values.
    with torch.device("meta"):
        reference = torchvision.models.vgg16().state_dict()
    torch.manual_seed(3)
    state = {k: torch.randn(v.shape) * 0.01 for k, v in reference.items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    backbone = build_model("fcn32s", NUM_CLASSES, "vgg16", weights=str(path)).backbone
    del state
    state = torch.load(path, weights_only=True)
    loaded = backbone.state_dict()
    for key in loaded:
        torch.testing.assert_close(loaded[key], state[key].reshape(loaded[key].shape), rtol=0, atol=0)
    # The convolution fc6 computes on a 7x7 pool5 map what the Linear computed on it flattened.
    pool5 = torch.randn(1, 512, 7, 7)
    with torch.no_grad():
        as_conv = backbone.classifier[0](pool5).flatten()
    as_linear = F.linear(pool5.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"]).flatten()
    torch.testing.assert_close(as_conv, as_linear, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- registry and config

def test_unknown_model_name_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as error:
        build_model("fcn4s")
    assert all(name in str(error.value) for name in MODELS)


def test_unknown_backbone_name_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as error:
        build_model("fcn8s", backbone="alexnet")
    assert all(name in str(error.value) for name in BACKBONES)


def test_build_model_from_config() -> None:
    model = build_model_from_config(ModelConfig(arch="fcn16s", backbone="mobilenet_v3_large"), num_classes=5)
    assert isinstance(model, FCN) and model.skips == (16,) and model.num_classes == 5
    assert model.backbone.name == "mobilenet_v3_large"


def test_invalid_skips_are_refused(cached_model) -> None:
    backbone = cached_model("fcn32s", "resnet18").backbone
    for skips in [(8, 16), (4,), (32,), (16, 16)]:
        with pytest.raises(ValueError):
            FCN(backbone, NUM_CLASSES, skips)


def test_channels_last_gives_the_same_output(cached_model) -> None:
    model = random_scores(cached_model("fcn8s", "resnet18"))
    x = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        expected = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s"])
def test_cpu_bf16_autocast_upsamples_the_final_scores_in_fp32(cached_model, arch: str) -> None:
    # oneDNN's bf16 transposed convolution with the x32/x16 kernels is many times slower
    # than fp32; the model keeps that one layer in fp32 under CPU autocast
    model = random_scores(cached_model(arch, "resnet18"))
    x = torch.randn(2, 3, 64, 96)
    seen: list[torch.dtype] = []
    hook = model.final_upsample.register_forward_hook(lambda _, args, out: seen.extend([args[0].dtype, out.dtype]))
    try:
        with torch.no_grad():
            expected = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
    finally:
        hook.remove()
    assert seen == [torch.float32] * 4  # input and output of the layer, without and with autocast
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # the backbone ran in bf16: close to fp32, not equal
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05 * expected.abs().amax().item())


# --------------------------------------------------------------------- pretrained weights

IMAGENET_FILES = {  # torchvision's cache file names (from the weights enums' urls)
    "vgg16": "vgg16-397923af.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-5c1a4163.pth",
}


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub dir; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_missing_pretrained_weights_name_the_expected_file(offline_hub: Path, backbone: str) -> None:
    with pytest.raises(WeightsNotFoundError) as error:
        build_model("fcn8s", backbone=backbone, pretrained=True)
    message = str(error.value)
    assert str(offline_hub / IMAGENET_FILES.get(backbone, "")) in message
    assert "model.weights=" in message


def save_torchvision_state(name: str, path: Path) -> dict[str, Tensor]:
    torch.manual_seed(4)
    state = getattr(torchvision.models, name)(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_backbone_equals(backbone: nn.Module, state: dict[str, Tensor]) -> None:
    loaded = backbone.state_dict()
    assert loaded  # and every key of ours came from the file:
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key].reshape(value.shape), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "vgg16"])  # vgg16: test above
def test_weights_file_loads_a_torchvision_state_dict(tmp_path: Path, backbone: str) -> None:
    state = save_torchvision_state(backbone, tmp_path / "backbone.pth")
    model = build_model("fcn8s", NUM_CLASSES, backbone, weights=str(tmp_path / "backbone.pth"))
    assert_backbone_equals(model.backbone, state)


def test_pretrained_loads_from_the_torch_hub_cache(offline_hub: Path) -> None:
    state = save_torchvision_state("resnet18", offline_hub / IMAGENET_FILES["resnet18"])
    assert_backbone_equals(build_model("fcn32s", NUM_CLASSES, "resnet18", pretrained=True).backbone, state)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        build_model("fcn8s", weights=str(missing))


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    save_torchvision_state("resnet18", tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match="resnet18.pth"):
        build_model("fcn8s", backbone="resnet50", weights=str(tmp_path / "resnet18.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        build_model("fcn8s", weights=str(tmp_path / "garbage.pth"))
