"""moco.resnet builds torchvision's ResNets: the same names, the same seeded weights, the same
outputs (collections and checkpoints made with torchvision's load and embed unchanged)."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from moco import resnet
from moco.encoders import ENCODERS, build_encoder


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_every_backbone_has_torchvisions_names_and_shapes(arch: str) -> None:
    with torch.device("meta"):  # no memory, no initialisation: seconds saved on ResNet-152
        ours, theirs = ENCODERS[arch]().state_dict(), getattr(tvm, arch)(weights=None).state_dict()
    assert list(ours) == list(theirs)  # names and order: state dicts load either way
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]


# the two blocks, and the wide one's width (ResNet-34/101/152 only stack more of the same)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2"])
def test_seeded_weights_are_torchvisions_bit_for_bit(arch: str) -> None:
    torch.manual_seed(7)
    ours = ENCODERS[arch]().state_dict()
    torch.manual_seed(7)
    theirs = getattr(tvm, arch)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_are_torchvisions(arch: str, train: bool) -> None:
    theirs = getattr(tvm, arch)(weights=None)
    for m in theirs.modules():  # BN statistics other than the initial ones, to be compared too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = getattr(resnet, arch)()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours.train(train), theirs.train(train)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_an_empty_encoder_is_shapes_only_and_takes_its_weights_whole() -> None:
    """``load_encoder`` builds the backbone empty (its random init took 0.26 s of each search)."""
    full = build_encoder("resnet18", small_stem=True)
    empty = build_encoder("resnet18", small_stem=True, empty=True)
    assert all(t.is_meta for t in empty.state_dict().values())
    empty.load_state_dict(full.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), full.eval()(x))
