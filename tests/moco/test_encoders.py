"""GeM pooling against average and max pooling, and swapping a ResNet's pooling."""

from __future__ import annotations

import pytest
import torch

from moco.encoders import GeM, build_encoder, with_pooling


def test_gem_is_average_pooling_at_p_1() -> None:
    x = torch.rand(2, 3, 5, 4)
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3), keepdim=True), atol=1e-6)


def test_gem_tends_to_max_pooling_as_p_grows() -> None:
    x = torch.rand(2, 3, 5, 4) + 0.1
    peak = x.amax(dim=(2, 3), keepdim=True)
    errors = [(GeM(p=p)(x) - peak).abs().max().item() for p in (1.0, 3.0, 10.0, 100.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05 * peak.min().item()


def test_with_pooling_swaps_the_resnet_pool() -> None:
    net = build_encoder("resnet18").eval()
    x = torch.rand(1, 3, 64, 64)
    avg = net(x)
    gem = with_pooling(net, "gem")(x)
    assert gem.shape == avg.shape and not torch.allclose(gem, avg)
    assert torch.allclose(with_pooling(net, "avg")(x), avg)
    with pytest.raises(ValueError, match="Unknown pooling 'max'; valid: avg, gem"):
        with_pooling(net, "max")


def test_stages_concatenate_normalised_pools_of_layers_2_to_4() -> None:
    net = build_encoder("resnet18").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        avg = with_pooling(net, "avg")(x)
        f = with_pooling(net, "stages")(x)
    assert f.shape == (2, 128 + 256 + 512)
    assert torch.allclose(f[:, 384:], torch.nn.functional.normalize(avg, dim=1), atol=1e-5)
    for part in (f[:, :128], f[:, 128:384], f[:, 384:]):  # each stage weighs the same
        assert torch.allclose(part.norm(dim=1), torch.ones(2), atol=1e-5)


def test_pooled_dim_is_the_width_the_pooling_gives() -> None:
    from moco.encoders import default_pooling, pooled_dim

    x = torch.randn(1, 3, 32, 32)
    for arch in ("resnet18", "resnet50"):
        net = build_encoder(arch).eval()
        with torch.no_grad():
            for pooling in ("avg", "stages"):
                assert with_pooling(net, pooling)(x).shape[1] == pooled_dim(arch, pooling)
    assert pooled_dim("resnet18", "stages") == 896 and pooled_dim("resnet50", "stages") == 3584
    assert default_pooling("resnet18") == "stages" and default_pooling("resnet50") == "avg"
