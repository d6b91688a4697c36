"""Tests for sdd_search.models: the registry, the factory and the torchvision adapter.

Nothing downloads: torchvision models are built with ``weights=None``; the one test of the
``pretrained=True`` path replaces torchvision's builder with a local one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sdd_search.models import (
    DistillModel,
    UnknownModelError,
    UnsupportedTorchvisionModelError,
    create_model,
    is_torchvision_name,
    list_models,
    list_torchvision_models,
    model_name_problem,
    register_model,
    wrap_torchvision_model,
)
from sdd_search.models.torchvision_adapter import torchvision_support_problem
from sdd_search.sdd import cell_logits


@pytest.fixture(autouse=True, scope="module")
def single_cpu_thread() -> Iterator[None]:
    """Run this module's tiny forward passes on one thread, then restore the setting.

    On a busy 2-core machine, two OpenMP threads on batch-2 convolutions stall each other
    (measured ~20x slower than one thread), so one thread keeps the module well under a minute.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


NUM_CLASSES = 100
SCALES = (1, 2, 4)

# Exact parameter counts at 100 classes, measured by running mdistiller's own
# mdistiller/models/cifar/*.py (megvii-research/mdistiller); ours must equal them.
MDISTILLER_PARAMETER_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}

# mdistiller's ImageNet MobileNetV1 (mdistiller/models/imagenet/mobilenetv1.py) at its fixed
# 1000 classes, summed from its layer list (3x3 convs without bias, BN weight + bias):
# stem 3*32*9 + 2*32 = 928; a depthwise-separable block (c -> d) has 9c + 2c + c*d + 2d,
# so 2_528 + 9_152 + 18_048 + 34_688 + 68_864 + 134_912 + 5 * 268_800 + 531_968 + 1_061_888
# = 3_206_048 for the 13 blocks; fc 1024 * 1000 + 1000 = 1_025_000. Total 4_231_976, the same
# as running mdistiller's class.
MDISTILLER_IMAGENET_PARAMETER_COUNTS = {"mobilenetv1": 4_231_976}

# The sizes the SDD / mdistiller papers quote for the networks they train, in millions.
PAPER_PARAMETER_MILLIONS = {
    "resnet32x4": 7.43,
    "resnet8x4": 1.23,
    "resnet56": 0.86,
    "resnet20": 0.28,
    "wrn_40_2": 2.26,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}

# (channels, side of the feature map) for a 32 x 32 input.
FEATURE_MAP_AT_32 = {
    **{name: (64, 8) for name in ("resnet8", "resnet14", "resnet20", "resnet32")},
    **{name: (64, 8) for name in ("resnet44", "resnet56", "resnet110")},
    "resnet8x4": (256, 8),
    "resnet32x4": (256, 8),
    "wrn_16_1": (64, 8),
    "wrn_16_2": (128, 8),
    "wrn_40_1": (64, 8),
    "wrn_40_2": (128, 8),
    **{name: (512, 4) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "mobilenetv1": (1024, 1),  # an ImageNet network: total stride 32
    "mobilenetv2": (1280, 2),
    "shufflenetv1": (960, 4),
    "shufflenetv2": (1024, 4),
}

# Side of the feature map for a 16 x 16 input.
FEATURE_SIDE_AT_16 = {
    "resnet8": 4,
    "resnet20": 4,
    "resnet8x4": 4,
    "resnet32x4": 4,
    "wrn_16_2": 4,
    "wrn_40_2": 4,
    "vgg8": 2,
    "vgg13": 2,
    "mobilenetv2": 1,
    "shufflenetv1": 2,
    "shufflenetv2": 2,
}


@functools.cache
def paper_model(name: str) -> DistillModel:
    """One shared 100-class instance per name, for the tests that only read it (in eval mode)."""
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES).eval()


@functools.cache
def torchvision_original(name: str) -> nn.Module:
    """One shared 10-class torchvision model per name (eval mode), built without weights."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def assert_close_up_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding; randomly initialised deep nets can have huge activations."""
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=1e-5)


# --- registry -------------------------------------------------------------------------------


def test_list_models_names_exactly_the_paper_networks() -> None:
    assert list_models() == sorted(
        [*MDISTILLER_PARAMETER_COUNTS, *MDISTILLER_IMAGENET_PARAMETER_COUNTS]
    )


def test_list_models_can_include_torchvision() -> None:
    names = list_models(include_torchvision=True)
    assert "resnet32x4" in names
    assert "torchvision/resnet50" in names
    assert "torchvision/vgg16" not in names  # no global-pool head: not offered


def test_unknown_name_lists_close_matches_on_one_line() -> None:
    with pytest.raises(UnknownModelError) as raised:
        create_model("resnet33", num_classes=10)
    message = str(raised.value)
    assert message.startswith("unknown model 'resnet33'; did you mean ")
    assert "resnet32" in message
    assert "sdd_search.models.list_models()" in message
    assert "\n" not in message
    assert isinstance(raised.value, ValueError)


def test_unknown_name_suggests_torchvision_prefix_and_mdistiller_spellings() -> None:
    with pytest.raises(UnknownModelError, match="torchvision/resnet18"):
        create_model("resnet18", num_classes=10)
    with pytest.raises(UnknownModelError, match="shufflenetv1"):
        create_model("ShuffleV1", num_classes=10)
    with pytest.raises(UnknownModelError, match="torchvision/convnext_tiny"):
        create_model("torchvision/convnext_tiy", num_classes=10)


def test_unknown_name_without_close_match_still_names_the_fix() -> None:
    with pytest.raises(UnknownModelError) as raised:
        create_model("zzzz", num_classes=10)
    assert str(raised.value) == "unknown model 'zzzz' (sdd_search.models.list_models() lists all)"


def test_register_model_rejects_a_duplicate_name() -> None:
    def resnet8(num_classes: int) -> DistillModel:
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet8)


def test_registered_models_refuse_pretrained_weights_but_accept_the_defaults() -> None:
    model = create_model("resnet8", num_classes=10, pretrained=False, weights=None)
    assert model.num_classes == 10
    with pytest.raises(ValueError, match="'resnet8' has no downloadable weights"):
        create_model("resnet8", num_classes=10, pretrained=True)


def test_is_torchvision_name() -> None:
    assert is_torchvision_name("torchvision/resnet50")
    assert not is_torchvision_name("resnet56")


# --- CIFAR networks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MDISTILLER_PARAMETER_COUNTS))
def test_parameter_count_equals_mdistiller(name: str) -> None:
    model = paper_model(name)
    assert count_parameters(model) == MDISTILLER_PARAMETER_COUNTS[name]
    if name in PAPER_PARAMETER_MILLIONS:
        assert count_parameters(model) / 1e6 == pytest.approx(
            PAPER_PARAMETER_MILLIONS[name], rel=0.02
        )


@pytest.mark.parametrize("name", sorted(FEATURE_MAP_AT_32))
def test_forward_returns_logits_and_the_map_they_pool(name: str) -> None:
    model = paper_model(name)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        features = model.forward_features(images)
        channels, side = FEATURE_MAP_AT_32[name]
        assert logits.shape == (2, NUM_CLASSES)
        assert features.shape == (2, channels, side, side)
        assert model.num_features == channels
        assert model.num_classes == NUM_CLASSES
        assert torch.equal(model.forward_features(images), features)
        assert_close_up_to_scale(model.forward_head(features), logits)
        # SDD's cell 0 is the global cell: it must reproduce the model's own logits.
        cells = cell_logits(features, model.get_classifier(), SCALES)
        assert cells.shape == (2, 21, NUM_CLASSES)
        assert_close_up_to_scale(cells[:, 0], logits)
        assert_close_up_to_scale(model.forward_cells(images, SCALES), cells)


@pytest.mark.parametrize("name", sorted(FEATURE_SIDE_AT_16))
def test_small_inputs_give_small_maps(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        images = torch.randn(1, 3, 16, 16)
        logits, features = model(images), model.forward_features(images)
    side = FEATURE_SIDE_AT_16[name]
    assert logits.shape == (1, 10)
    assert features.shape == (1, model.num_features, side, side)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv1"])
def test_sdd_loss_backpropagates_through_the_features_in_train_mode(name: str) -> None:
    model = create_model(name, num_classes=10).train()
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    logits = model.forward_head(features)
    cells = cell_logits(features, model.get_classifier(), SCALES)
    loss = F.cross_entropy(logits, torch.tensor([1, 2])) + cells.square().mean()
    loss.backward()
    gradients = [parameter.grad for parameter in model.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)


@pytest.mark.parametrize(
    "name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"]
)
def test_channels_last_input_gives_the_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(images), model.forward_features(images)
        model = model.to(memory_format=torch.channels_last)
        images_cl = images.to(memory_format=torch.channels_last)
        logits_cl, features_cl = model(images_cl), model.forward_features(images_cl)
    assert_close_up_to_scale(logits_cl, logits)
    assert_close_up_to_scale(features_cl, features)


# --- torchvision adapter --------------------------------------------------------------------

# name -> channels of the last feature map (a 64 x 64 input gives 2 x 2 maps for all of them).
TORCHVISION_FEATURE_CHANNELS = {
    "resnet18": 512,
    "mobilenet_v2": 1280,
    "shufflenet_v2_x1_0": 1024,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
    "densenet121": 1024,
    "mobilenet_v3_small": 576,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_FEATURE_CHANNELS))
def test_torchvision_wrapper_reproduces_the_original_logits(name: str) -> None:
    original = torchvision_original(name)
    wrapped = wrap_torchvision_model(original).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = original(images)
        logits, features = wrapped(images), wrapped.forward_features(images)
        channels = TORCHVISION_FEATURE_CHANNELS[name]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert features.shape == (1, channels, 2, 2)
        assert (wrapped.num_features, wrapped.num_classes) == (channels, 10)
        head_on_cells = wrapped.get_classifier()(torch.randn(1, 21, channels))
        assert head_on_cells.shape == (1, 21, 10)
        cells = cell_logits(features, wrapped.get_classifier(), SCALES)
        torch.testing.assert_close(cells[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_torchvision_wrapper_shares_the_original_parameters() -> None:
    original = torchvision_original("resnet18")
    wrapped = wrap_torchvision_model(original)
    assert wrapped.get_classifier() is original.fc
    assert wrapped.features.layer4 is original.layer4


def test_convnext_head_is_layer_norm_over_channels_then_linear() -> None:
    original = torchvision_original("convnext_tiny")
    head = wrap_torchvision_model(original).get_classifier()
    assert isinstance(head, nn.Sequential)
    norm, linear = head
    assert type(norm) is nn.LayerNorm and norm.weight is original.classifier[0].weight
    assert linear is original.classifier[2]


def test_create_model_builds_a_torchvision_model() -> None:
    model = create_model("torchvision/mobilenet_v3_small", num_classes=7)
    assert isinstance(model, DistillModel)
    images = torch.randn(1, 3, 64, 64)
    logits, features = model.eval()(images), model.forward_features(images)
    assert logits.shape == (1, 7)
    assert features.shape == (1, 576, 2, 2)


def test_pretrained_uses_default_weights_and_a_fresh_last_linear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requested_weights = []
    build = torchvision.models.get_model

    def get_model_without_download(name: str, weights: object = None, **kwargs: object):
        requested_weights.append(weights)
        return build(name, weights=None, **kwargs)  # 1000 classes, as ImageNet weights have

    monkeypatch.setattr(torchvision.models, "get_model", get_model_without_download)
    model = create_model("torchvision/shufflenet_v2_x0_5", num_classes=10, pretrained=True)
    assert requested_weights == ["DEFAULT"]
    assert model.get_classifier().out_features == 10
    assert model.num_classes == 10


def test_torchvision_model_without_a_global_pool_head_is_refused() -> None:
    with pytest.raises(UnsupportedTorchvisionModelError, match="no nn.Linear classifier"):
        create_model("torchvision/squeezenet1_1", num_classes=10)

    class GridPooledClassifier(nn.Module):  # VGG's shape: a 7x7 grid flattened into a Linear
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3)
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Linear(4 * 49, 10)

    with pytest.raises(UnsupportedTorchvisionModelError, match=r"\(7, 7\) grid|7 grid"):
        wrap_torchvision_model(GridPooledClassifier())


def test_forward_cells_on_a_torchvision_model_starts_with_its_logits() -> None:
    wrapped = wrap_torchvision_model(torchvision_original("resnet18")).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        cells = wrapped.forward_cells(images, (1, 2))
        torch.testing.assert_close(cells[:, 0], wrapped(images), rtol=1e-5, atol=1e-5)
    assert cells.shape == (1, 5, 10)


# --- model names, as a spec check sees them ---------------------------------------------------


def test_model_name_problem_is_none_for_what_create_model_builds() -> None:
    assert model_name_problem("resnet8x4") is None
    assert model_name_problem("mobilenetv1") is None
    assert model_name_problem("torchvision/resnet18") is None


def test_model_name_problem_names_unknown_models_like_create_model() -> None:
    for name in ("resnet33", "resnet18", "torchvision/resnet51", "zzzz"):
        with pytest.raises(UnknownModelError) as raised:
            create_model(name, num_classes=10)
        assert model_name_problem(name) == str(raised.value)
    assert "did you mean torchvision/resnet50" in (model_name_problem("torchvision/resnet51") or "")


def test_model_name_problem_refuses_unsupported_torchvision_models_without_building_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_build(*args: object, **kwargs: object) -> nn.Module:
        raise AssertionError("a name check must not build a model")

    monkeypatch.setattr(torchvision.models, "get_model", no_build)
    problem = model_name_problem("torchvision/vit_b_16")
    assert problem is not None and "\n" not in problem
    assert problem.startswith("torchvision model 'vit_b_16' is not supported (")
    assert "class token" in problem
    with pytest.raises(UnsupportedTorchvisionModelError) as raised:
        create_model("torchvision/vit_b_16", num_classes=10, pretrained=True)  # no download
    assert str(raised.value) == problem
    assert model_name_problem("torchvision/vgg16") is not None


# One model per torchvision family, the smallest; the family is the name's leading letters.
TORCHVISION_FAMILY_EXAMPLES = (
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "swin_t",
    "swin_v2_t",
    "vgg11",
    "vit_b_16",
    "wide_resnet50_2",
)


def torchvision_family(name: str) -> str:
    return re.match(r"[a-z]+", name).group()  # type: ignore[union-attr]


def build_without_weights(name: str) -> nn.Module:
    """torchvision's ``name`` with no weights, on the meta device (no memory, no init) when the
    constructor allows it."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None)
    except NotImplementedError:  # regnet's constructor reads values out of tensors
        return torchvision.models.get_model(name, weights=None)


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
def test_the_name_check_agrees_with_the_split_for_every_torchvision_family() -> None:
    families = {torchvision_family(name) for name in list_torchvision_models(supported_only=False)}
    assert families == {torchvision_family(name) for name in TORCHVISION_FAMILY_EXAMPLES}, (
        "a new torchvision family: add one of its models to TORCHVISION_FAMILY_EXAMPLES"
    )
    for name in TORCHVISION_FAMILY_EXAMPLES:
        try:
            wrap_torchvision_model(build_without_weights(name))
            splits = True
        except UnsupportedTorchvisionModelError:
            splits = False
        assert (torchvision_support_problem(name) is None) == splits, name
        assert (model_name_problem(f"torchvision/{name}") is None) == splits, name
        assert (f"torchvision/{name}" in list_models(include_torchvision=True)) == splits, name


# --- ImageNet MobileNetV1 -----------------------------------------------------------------------


def test_mobilenetv1_parameter_count_and_layout_equal_mdistiller() -> None:
    model = create_model("mobilenetv1", num_classes=1000)
    assert count_parameters(model) == MDISTILLER_IMAGENET_PARAMETER_COUNTS["mobilenetv1"]
    assert count_parameters(model) / 1e6 == pytest.approx(4.23, abs=0.005)
    # mdistiller's module names, so its checkpoints load as they are.
    keys = model.state_dict().keys()
    assert {"model.0.0.weight", "model.13.3.weight", "model.13.4.running_var", "fc.bias"} <= keys
    # The stem's conv + BN (5 entries), then 13 blocks of two convs and two BNs.
    assert len([key for key in keys if key.startswith("model.")]) == 6 + 13 * 12


def test_mobilenetv1_gives_7x7_maps_at_224_and_21_cells_on_them() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv1", num_classes=10).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (1, 1024, 7, 7)
        assert model.num_features == 1024 and model.num_classes == 10
        logits = model.forward_head(features)
        assert logits.shape == (1, 10)
        cells = cell_logits(features, model.get_classifier(), SCALES)  # 1 + 4 + 16 on 7 x 7
    assert cells.shape == (1, 21, 10)
    assert_close_up_to_scale(cells[:, 0], logits)


def test_mobilenetv1_forward_and_forward_cells_at_64_pixels() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv1", num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(images)
        cells = model.forward_cells(images, SCALES)  # a 2 x 2 map: adaptive cells overlap
    assert model.forward_features(images).shape == (2, 1024, 2, 2)
    assert logits.shape == (2, 10) and cells.shape == (2, 21, 10)
    assert_close_up_to_scale(cells[:, 0], logits)
