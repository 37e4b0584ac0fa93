"""Tests of the model zoo: shapes, gradients, norm choice, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labeldp.errors import ConfigError
from labeldp.models import (
    MODELS,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    convert_batchnorm_to_groupnorm,
    has_batch_statistics,
    make_norm,
)

# name -> (in_channels, image_size) of the input the test feeds it
FAST_MODELS = {"cnn": (1, 28), "resnet18": (3, 32), "wrn28-2": (3, 32)}
NORMS = ("batch", "group")


def _build(name: str, norm: str, num_classes: int = 10) -> nn.Module:
    channels, size = FAST_MODELS[name]
    torch.manual_seed(0)
    return build_model(
        name, num_classes=num_classes, in_channels=channels, image_size=size, norm=norm
    )


def _input(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    channels, size = FAST_MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_documented_names():
    expected = {"cnn", "resnet18", "wrn28-2", "wrn28-4", "wrn28-8", "wrn28-10"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_forward_shape_and_backward(name, norm):
    model = _build(name, norm, num_classes=7)
    model.train()
    logits = model(_input(name))
    assert logits.shape == (2, 7)
    assert logits.dtype == torch.float32
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_norm_choice_controls_batch_statistics(name, norm):
    model = _build(name, norm)
    assert has_batch_statistics(model) == (norm == "batch")
    kinds = {type(m) for m in model.modules()}
    if norm == "group":
        assert nn.GroupNorm in kinds
        assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    else:
        assert nn.BatchNorm2d in kinds
        assert nn.GroupNorm not in kinds


@pytest.mark.parametrize("width", [4, 8, 10])
def test_wide_wrn_names_build_with_their_width(width):
    model = build_model(f"wrn28-{width}", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(model, WideResNet)
    assert (model.depth, model.width) == (28, width)
    assert model.fc.in_features == 64 * width


def test_any_wrn_name_parses():
    model = build_model("wrn10-1", num_classes=3, in_channels=1, image_size=16, norm="group")
    assert (model.depth, model.width) == (10, 1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_convert_batchnorm_to_groupnorm(name):
    model = _build(name, "batch").eval()
    x = _input(name)
    assert has_batch_statistics(model)
    converted = convert_batchnorm_to_groupnorm(model)
    assert converted is model
    assert not has_batch_statistics(model)
    assert model(x).shape == (2, 10)


def test_convert_keeps_shape_groups_and_affine():
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(-1.0)
    gn = convert_batchnorm_to_groupnorm(bn)
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.num_channels) == (16, 16)
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)

    model = nn.Sequential(nn.Linear(4, 64), nn.BatchNorm1d(64), nn.ReLU()).eval()
    convert_batchnorm_to_groupnorm(model)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 32
    assert not model[1].training
    assert model(torch.randn(3, 4)).shape == (3, 64)


@pytest.mark.parametrize(("channels", "groups"), [(16, 16), (64, 32), (48, 16), (512, 32)])
def test_make_norm(channels, groups):
    gn = make_norm("group", channels)
    assert isinstance(gn, nn.GroupNorm) and gn.affine
    assert (gn.num_groups, gn.num_channels) == (groups, channels)
    bn = make_norm("batch", channels)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == channels


def test_resnet18_parameter_count():
    assert _num_params(ResNet18(10, in_channels=3)) == 11_173_962
    assert _num_params(ResNet18(10, in_channels=3, norm="group")) == 11_173_962


def test_wrn28_2_parameter_count():
    count = _num_params(WideResNet(10, depth=28, width=2))
    assert count == 1_467_610
    assert abs(count - 1_467_610) <= 0.01 * 1_467_610  # FixMatch's reported WRN-28-2 size
    assert _num_params(WideResNet(10, depth=28, width=2, norm="group")) == count


def test_small_cnn_parameter_count():
    assert _num_params(SmallCNN(10)) == 421_738


def _first_output(model: nn.Module, name: str, partner_seed: int) -> torch.Tensor:
    """Output for example 0 of a batch of 2 whose second example depends on the seed."""
    x = _input(name, batch=2, seed=1)
    x[1] = _input(name, batch=1, seed=partner_seed)[0] * 3.0 + 1.0
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_group_norm_outputs_are_batch_independent(name, mode):
    model = _build(name, "group").train(mode == "train")
    first = _first_output(model, name, partner_seed=2)
    second = _first_output(model, name, partner_seed=3)
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_batch_norm_in_train_mode_mixes_examples(name):
    model = _build(name, "batch").train()
    first = _first_output(model, name, partner_seed=2)
    second = _first_output(model, name, partner_seed=3)
    assert not torch.allclose(first, second, rtol=1e-3, atol=1e-3)


# ---- errors -------------------------------------------------------------------------------


def _config_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_unknown_model_name_lists_known_names():
    message = _config_error(build_model, "vgg16", num_classes=10, in_channels=3, image_size=32)
    assert "model name" in message and "'vgg16'" in message
    for known in ("cnn", "resnet18", "wrn28-2", "wrn28-10"):
        assert repr(known) in message


@pytest.mark.parametrize("name", ["wrn28-0", "wrn28-x", "wrn28-", "wrn-2"])
def test_bad_wrn_name(name):
    message = _config_error(build_model, name, num_classes=10, in_channels=3, image_size=32)
    assert "model name" in message and repr(name) in message
    assert "width" in message


def test_bad_wrn_depth():
    assert "depth" in _config_error(WideResNet, 10, depth=27)
    assert "depth" in _config_error(
        build_model, "wrn27-2", num_classes=10, in_channels=3, image_size=32
    )


@pytest.mark.parametrize("size", [30, 0])
def test_bad_image_size_for_cnn(size):
    message = _config_error(build_model, "cnn", num_classes=10, in_channels=1, image_size=size)
    assert "image_size" in message
    assert "image_size" in _config_error(SmallCNN, 10, image_size=size)


@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_bad_norm_kind(name):
    message = _config_error(
        build_model, name, num_classes=10, in_channels=3, image_size=32, norm="layer"
    )
    assert "norm" in message and "'batch'" in message and "'group'" in message
    assert "norm" in _config_error(make_norm, "instance", 8)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"num_classes": 0, "in_channels": 1, "image_size": 28}, "num_classes"),
        ({"num_classes": 10, "in_channels": 0, "image_size": 28}, "in_channels"),
        ({"num_classes": 10, "in_channels": 1, "image_size": 28.0}, "image_size"),
    ],
)
def test_bad_sizes(kwargs, parameter):
    assert parameter in _config_error(build_model, "cnn", **kwargs)


# ---- sequence models ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lstm-rows", "vit-patches"])
def test_sequence_models_forward_backward_and_batch_independence(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=2, image_size=14, norm="group")
    assert not has_batch_statistics(model)
    x = torch.randn(3, 2, 14, 14)
    logits = model(x)
    assert logits.shape == (3, 7)
    nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # one example's output does not depend on the others in its batch
    torch.testing.assert_close(model(x[:1]), logits[:1].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", ["RowLSTM", "PatchTransformer"])
def test_sequence_models_dp_form_equals_the_fused_one(cls):
    """The default (DP-layer) form computes the same function as the fused torch layers:
    labeldp.dpsgd.fix turns the fused model into the DP form with the same weights."""
    import labeldp.models as zoo
    from labeldp.dpsgd import DPLSTM, DPMultiheadAttention, fix, validate

    torch.manual_seed(0)
    fused = getattr(zoo, cls)(5, in_channels=1, image_size=14, fused=True)
    assert validate(fused)  # torch's LSTM / attention: not DP-ready
    dp = fix(fused)
    assert validate(dp) == []
    assert any(isinstance(m, (DPLSTM, DPMultiheadAttention)) for m in dp.modules())
    torch.manual_seed(0)
    fused = getattr(zoo, cls)(5, in_channels=1, image_size=14, fused=True).eval()
    x = torch.randn(4, 1, 14, 14)
    torch.testing.assert_close(dp.eval()(x), fused(x), rtol=1e-5, atol=1e-5)
    default = getattr(zoo, cls)(5, in_channels=1, image_size=14)
    assert validate(default) == []


def test_sequence_model_bad_sizes():
    from labeldp.models import PatchTransformer, RowLSTM

    assert "multiple of patch" in _config_error(PatchTransformer, 10, image_size=30, patch=7)
    assert "heads" in _config_error(PatchTransformer, 10, dim=30, heads=4)
    assert "hidden" in _config_error(RowLSTM, 10, hidden=0)
