"""torchvision ResNets and user networks with deformable convs: equivalence at zero offsets, placement, errors,
pretrained weights."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from harness.config import ModelConfig, RunConfig, config_hash
from harness.errors import HarnessError
from harness.models import build_network, check_network, conv_layers, deformable_names, offset_parameters
from harness.ops import DeformConv2d
from harness.train import build_optimizer


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".offset_predictor." not in k}


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_zero_offsets_compute_what_torchvision_computes(arch: str) -> None:
    torch.manual_seed(0)
    model = build_network(ModelConfig(arch=arch, deform_layers="c3-c5"), 10).eval()
    reference = getattr(torchvision.models, arch)(num_classes=10).eval()
    reference.load_state_dict(_plain_state(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    deform = [m for m in model.modules() if isinstance(m, DeformConv2d)]
    assert deform and all(m.kernel_size == (3, 3) for m in deform)
    assert any(m.stride == (2, 2) for m in deform)  # the first block of c3..c5 downsamples


def test_stages_and_globs_choose_the_3x3_convs() -> None:
    c5 = check_network(ModelConfig(arch="resnet18", deform_layers="c5"))
    assert c5 == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert len(check_network(ModelConfig(arch="resnet18", deform_layers="c3-c5"))) == 12
    assert check_network(ModelConfig(arch="resnet18", deform_layers=["c4", "c5"])) == check_network(
        ModelConfig(arch="resnet18", deform_layers="c4-c5"))
    assert check_network(ModelConfig(arch="resnet50", deform_layers="c5")) == [f"layer4.{i}.conv2" for i in range(3)]
    assert check_network(ModelConfig(arch="resnet18", deform_modules=["layer3.*.conv2"])) == [
        "layer3.0.conv2", "layer3.1.conv2"]
    assert len(check_network(ModelConfig(arch="resnet18", deform_layers="all"))) == 16  # every 3×3, no stem
    model = build_network(ModelConfig(arch="resnet18", deform_layers="last:2"), 5)
    names = [name for name, _ in conv_layers(model)]
    assert [names[i] for i in model.deform_indices] == ["layer4.1.conv1", "layer4.1.conv2"]
    assert model.conv_names == names and names[0] == "conv1"


def test_options_geometry_and_weights_carry_over() -> None:
    torch.manual_seed(0)
    config = ModelConfig(arch="resnet18", deform_layers="c4", offset_channels="shared", modulated=True,
                         offset_groups=2, backend="torchvision")
    model = build_network(config, 3)
    layer = model.layer3[0].conv1
    assert isinstance(layer, DeformConv2d) and layer.stride == (2, 2) and layer.padding == (1, 1)
    assert (layer.offset_channels, layer.modulated, layer.offset_groups, layer.backend) == (
        "shared", True, 2, "torchvision")
    assert torch.count_nonzero(layer.offset_predictor.weight) == 0
    assert deformable_names(model) == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]
    optimizer = build_optimizer(model, RunConfig(model=config), 1e-3)
    offsets = next(g for g in optimizer.param_groups if g["name"] == "offsets")
    assert len(offsets["params"]) == len(list(offset_parameters(model))) == 8


@pytest.mark.parametrize("fields,message", [
    ({"arch": "resnet18", "deform_layers": "c1"}, "unknown stage 'c1'"),
    ({"arch": "resnet18", "deform_modules": ["conv1"]}, r"conv0 \(conv1\) cannot be made deformable: it is a 7×7"),
    ({"arch": "resnet18", "deform_modules": ["layer9.*"]}, "pattern 'layer9.*': it matches no module"),
    ({"arch": "resnet18", "deform_modules": ["layer3.0.bn1"]}, "matches modules but no conv"),
    ({"arch": "resnet50", "deform_modules": ["layer4.0.*"]}, "is a 1×1 conv"),
    ({"arch": "resnet18", "deform_layers": "c5", "deform_modules": ["layer4.*"]}, "either deform_layers or"),
    ({"arch": "unet_encoder", "deform_layers": ["c5"]}, "stage names apply to the resnet archs only"),
    ({"arch": "no_such_module_x:net"}, "cannot import no_such_module_x"),
    ({"arch": "resnet101"}, "unknown arch 'resnet101'"),
])
def test_bad_placements_are_one_line_errors_at_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**fields)


def test_new_keys_leave_old_configs_hash_alone() -> None:
    assert config_hash(RunConfig()) == "986e6280ea99"  # the default config's identity since v0.1
    assert config_hash(RunConfig(model=ModelConfig(pretrained="x.pth"))) != config_hash(RunConfig())


FACTORY = textwrap.dedent("""
    import torch.nn.functional as F
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.body = nn.ModuleDict({"a": nn.Conv2d(8, 8, 3, padding=1), "b": nn.Conv2d(8, 8, 3, padding=2,
                                       dilation=2, groups=2, bias=False)})
            self.wide = nn.Conv2d(8, 8, 5, padding=2)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            x = F.relu(self.stem(x))
            x = x + F.relu(self.body["b"](F.relu(self.body["a"](x))))
            return self.fc(self.wide(x).mean((2, 3)))

    def tiny(num_classes=80):
        return Tiny(num_classes)

    def not_a_module():
        return 3
""")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "harness_user_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "harness_user_nets"


def test_user_factory_converted_by_glob(user_module: str) -> None:
    config = ModelConfig(arch=f"{user_module}:tiny", deform_modules=["body.*"])
    torch.manual_seed(0)
    model = build_network(config, 4)
    b = model.body["b"]
    assert isinstance(b, DeformConv2d) and (b.dilation, b.padding, b.groups, b.bias) == ((2, 2), (2, 2), 2, None)
    assert model.fc.out_features == 4 and model.deform_indices == [1, 2]
    plain = build_network(ModelConfig(arch=f"{user_module}:tiny"), 4)
    plain.load_state_dict(_plain_state(model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValidationError, match=r"conv3 \(wide\) cannot be made deformable: it is a 5×5"):
        ModelConfig(arch=f"{user_module}:tiny", deform_modules=["wide"])
    with pytest.raises(ValidationError, match="returned a int, not an nn.Module"):
        ModelConfig(arch=f"{user_module}:not_a_module")
    with pytest.raises(ValidationError, match="has no callable 'missing'"):
        ModelConfig(arch=f"{user_module}:missing")


def test_pretrained_from_a_file_skips_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_network(ModelConfig(arch="resnet18", deform_layers="c5", pretrained=str(path)), 7)
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.layer2[0].bn1.running_var, source.layer2[0].bn1.running_var)
    assert model.fc.out_features == 7
    unloaded = build_network(ModelConfig(arch="resnet18", pretrained=str(path)), 7, load_pretrained_weights=False)
    assert not torch.equal(unloaded.conv1.weight, source.conv1.weight)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(HarnessError, match="does not fit this network: .* weights unexpected"):
        build_network(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "r34.pth")), 7)
    with pytest.raises(HarnessError, match="no weights file at"):
        build_network(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "nope.pth")), 7)


def test_pretrained_weights_name_resolves_only_in_the_hub_cache(tmp_path: Path) -> None:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        config = ModelConfig(arch="resnet18", pretrained="ResNet18_Weights.IMAGENET1K_V1")
        expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        with pytest.raises(HarnessError, match=f"{expected} does not exist; nothing is downloaded, put the file from "
                                               "https://download.pytorch.org/models/resnet18-f37072fd.pth there"):
            build_network(config, 3)
        expected.parent.mkdir(parents=True)
        torch.manual_seed(2)
        source = torchvision.models.resnet18()
        torch.save(source.state_dict(), expected)
        torch.testing.assert_close(build_network(config, 3).layer1[0].conv1.weight, source.layer1[0].conv1.weight)
        with pytest.raises(HarnessError, match="not a torchvision weights name"):
            build_network(ModelConfig(arch="resnet18", pretrained="ResNet18_Weights.NOPE"), 3)
    finally:
        torch.hub.set_dir(previous)


@pytest.mark.parametrize("key,value", [("width", 0.5), ("dropout", 0.0)])
def test_keys_a_resnet_would_ignore_are_refused(key: str, value: float) -> None:
    with pytest.raises(ValidationError, match=f"{key} applies to the harness's own networks"):
        ModelConfig(arch="resnet18", **{key: value})
    assert ModelConfig(arch="resnet18", **{key: ModelConfig.model_fields[key].default}).arch == "resnet18"
