"""Model factory: every registered architecture builds, runs and reports bad names."""

import pytest
import torch

from srpu_pipelines.models.checkpoint import load_model, save_checkpoint
from srpu_pipelines.models.factory import (
    ARCHITECTURES,
    UnknownNameError,
    create_model,
    load_weights,
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_gives_finite_full_size_logits(arch):
    torch.manual_seed(0)
    if arch == "dpt":  # the ViT architecture
        m = create_model(arch, "tu-vit_tiny_patch16_224", 3, in_channels=1, encoder_depth=4)
    else:
        m = create_model(arch, "resnet18", num_classes=3, in_channels=1)
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_timm_encoder_and_grey_input():
    m = create_model(
        "unet", "tu-resnet10t", 4, in_channels=1, encoder_depth=4, decoder_channels=[32, 16, 8, 8]
    ).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 64, 96)).shape == (1, 4, 64, 96)


def test_unknown_names_list_valid_ones():
    with pytest.raises(
        UnknownNameError, match=r"model\.arch: unknown architecture 'segformer'; valid: .*unet"
    ):
        create_model("segformer", "resnet18", 3)
    with pytest.raises(
        UnknownNameError, match=r"model\.encoder: unknown encoder 'resnet19'.*resnet18.*tu-"
    ):
        create_model("unet", "resnet19", 3)
    with pytest.raises(ValueError, match=r"model\.encoder_depth"):
        create_model("fpn", "resnet18", 3, encoder_depth=4)


def test_local_weights_whole_model_and_encoder_only(tmp_path):
    a = create_model("unet", "resnet18", 3, encoder_depth=3, decoder_channels=[16, 8, 8])
    torch.save({"model": a.state_dict()}, tmp_path / "full.pt")
    torch.save(a.encoder.state_dict(), tmp_path / "enc.pt")
    b = create_model(
        "unet",
        "resnet18",
        3,
        encoder_depth=3,
        decoder_channels=[16, 8, 8],
        weights=tmp_path / "full.pt",
    )
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())
    c = create_model("unet", "resnet18", 3, encoder_depth=3, decoder_channels=[16, 8, 8])
    info = load_weights(c, tmp_path / "enc.pt")
    assert info["loaded"] == len(a.encoder.state_dict())
    assert torch.equal(c.encoder.conv1.weight, a.encoder.conv1.weight)
    with pytest.raises(ValueError, match=r"no tensor in .*enc\.pt matches"):
        load_weights(create_model("unet", "efficientnet-b0", 3), tmp_path / "enc.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(
            create_model(
                "unet", "resnet18", 3, in_channels=3, encoder_depth=3, decoder_channels=[16, 8, 8]
            ),
            tmp_path / "full.pt",
        )
    (tmp_path / "junk.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"junk\.pt is not a loadable state_dict"):
        load_weights(c, tmp_path / "junk.pt")


# the JSON config of a small depth-3 U-Net, as save_checkpoint writes it beside the .pt
SMALL_CFG = {
    "arch": "unet",
    "encoder": "resnet18",
    "in_channels": 1,
    "encoder_depth": 3,
    "decoder_channels": [16, 8, 8],
    "num_classes": 3,
}


def _small_unet() -> torch.nn.Module:
    return create_model("unet", "resnet18", 3, encoder_depth=3, decoder_channels=[16, 8, 8]).eval()


def test_checkpoint_round_trip(tmp_path):
    cfg = dict(SMALL_CFG)
    m = _small_unet()
    save_checkpoint(tmp_path / "best.pt", m, cfg)
    back, cfg2 = load_model(tmp_path / "best.pt")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert cfg2 == cfg and not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_shallow_resnet_drops_the_stages_it_never_runs(tmp_path):
    import segmentation_models_pytorch as smp

    m = _small_unet()
    assert sum(p.numel() for p in m.parameters()) < 1_000_000  # not resnet18's 11 M
    # a checkpoint written before the stages were dropped still loads, to the same output
    old = smp.Unet(
        "resnet18",
        encoder_weights=None,
        in_channels=1,
        classes=3,
        encoder_depth=3,
        decoder_channels=[16, 8, 8],
    ).eval()
    assert any(k.startswith("encoder.layer4.") for k in old.state_dict())
    cfg = dict(SMALL_CFG)
    save_checkpoint(tmp_path / "old.pt", old, cfg)
    back, _ = load_model(tmp_path / "old.pt")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(old(x), back(x))


def test_full_resolution_skip_feeds_the_last_block_and_round_trips(tmp_path):
    from srpu_pipelines.config import ModelParams
    from srpu_pipelines.errors import InputError

    torch.manual_seed(0)
    m = create_model(
        "unet", "resnet18", 3, encoder_depth=3, decoder_channels=[16, 8, 8], full_res_skip=4
    )
    x = torch.randn(2, 1, 32, 48)
    out = m(x)
    assert out.shape == (2, 3, 32, 48)
    out.square().mean().backward()
    # the input's own conv is on the path to the logits: it gets a gradient
    grad = m.decoder.input_skip[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # the last block reads 8 upsampled channels + the 4 of the skip
    assert m.decoder.blocks[-1].conv1[0].in_channels == 8 + 4
    cfg = {**SMALL_CFG, "full_res_skip": 4}
    save_checkpoint(tmp_path / "skip.pt", m.eval(), cfg)
    back, cfg2 = load_model(tmp_path / "skip.pt")
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert cfg2["full_res_skip"] == 4
    # its weights do not fit a model without the skip: an error naming the file
    save_checkpoint(tmp_path / "plain.pt", m, SMALL_CFG)
    with pytest.raises(InputError, match=r"plain\.pt: weights do not fit"):
        load_model(tmp_path / "plain.pt")
    with pytest.raises(InputError, match="full_res_skip applies to unet"):
        create_model("fpn", "resnet18", 3, full_res_skip=4)
    with pytest.raises(ValueError, match="full_res_skip applies to unet"):
        ModelParams(arch="fpn", encoder="resnet18", full_res_skip=8)
    with pytest.raises(ValueError, match="full_res_skip"):
        ModelParams(full_res_skip=-1)


def test_full_resolution_skip_keeps_smps_centre_block():
    plain = create_model("unet", "vgg11", 2, encoder_depth=3, decoder_channels=[16, 8, 8])
    skip = create_model(
        "unet", "vgg11", 2, encoder_depth=3, decoder_channels=[16, 8, 8], full_res_skip=4
    )
    assert not isinstance(plain.decoder.center, torch.nn.Identity)  # smp adds one for vgg
    assert type(skip.decoder.center) is type(plain.decoder.center)
    with torch.no_grad():
        assert skip.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
