"""MAE pretraining: masking, the loss, no leakage of masked content, weight transfer."""

import pytest
import torch

from srpu_pipelines.models.factory import create_model, load_weights, model_from_params
from srpu_pipelines.pipeline.steps import run_index, run_pretrain
from srpu_pipelines.training.mae import (
    CnnMae,
    VitMae,
    build_mae,
    masked_patch_loss,
    random_patch_mask,
    resolve_method,
    upsample_mask,
)


@pytest.mark.parametrize("ratio,gh,gw", [(0.6, 4, 4), (0.75, 8, 8), (0.5, 3, 5), (0.9, 2, 2)])
def test_mask_ratio_is_honoured_per_image(ratio, gh, gw):
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(16, gh, gw, ratio, g)
    want = min(max(round(ratio * gh * gw), 1), gh * gw - 1)
    assert m.shape == (16, gh, gw) and m.dtype == torch.bool
    assert (m.view(16, -1).sum(1) == want).all()
    assert len({tuple(x.flatten().tolist()) for x in m}) > 1  # positions differ per image


def test_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 1, 32, 32, generator=g)
    pred = torch.randn(2, 1, 32, 32, generator=g)
    mask = random_patch_mask(2, 4, 4, 0.5, g)
    base = masked_patch_loss(pred, target, mask, 8, norm_pix=True)
    vis = upsample_mask(mask, (32, 32)).bool()
    changed_visible = torch.where(vis, pred + 5.0, pred)
    changed_masked = torch.where(vis, pred, pred + 5.0)
    assert torch.isclose(masked_patch_loss(changed_visible, target, mask, 8, True), base)
    assert masked_patch_loss(changed_masked, target, mask, 8, True) > base + 1.0
    # a perfect prediction of the (un-normalised) masked patches gives zero loss
    assert masked_patch_loss(target, target, mask, 8, norm_pix=False) == 0
    pred.requires_grad_(True)
    masked_patch_loss(pred, target, mask, 8, True).backward()
    assert (pred.grad[vis] == 0).all() and (pred.grad[~vis] != 0).any()


def _unet():
    return create_model("unet", "resnet18", 3, encoder_depth=3, decoder_channels=[16, 8, 8])


@pytest.mark.parametrize("train_mode", [True, False])
def test_cnn_encoder_never_sees_masked_content(train_mode):
    model = _unet()
    mae = build_mae(model, "cnn", 1, 16, 16, 1)
    assert isinstance(mae, CnnMae)
    mae.train(train_mode)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 64, 64, generator=g)
    mask = random_patch_mask(2, 4, 4, 0.6, g)
    hidden = ~upsample_mask(mask, (64, 64)).bool()
    x2 = torch.where(hidden, torch.randn(x.shape, generator=g) * 3, x)
    with torch.no_grad():
        f1, f2 = mae.encode(x, mask), mae.encode(x2, mask)
        r = mae(x, mask)
    assert torch.equal(f1, f2)
    assert r.shape == (2, 1, 64, 64)
    # masked cells of the deepest features are all zero (the decoder puts mask tokens there)
    deep_hidden = ~upsample_mask(mask, f1.shape[-2:]).bool().expand_as(f1)
    assert (f1[deep_hidden] == 0).all() and (f1[~deep_hidden] != 0).any()


def test_vit_path_drops_masked_patches():
    model = create_model("dpt", "tu-vit_tiny_patch16_224", 3, encoder_depth=4)
    assert resolve_method("auto", "tu-vit_tiny_patch16_224") == "vit"
    assert resolve_method("auto", "resnet18") == "cnn"
    mae = build_mae(model, "vit", 1, 32, 32, 1)
    assert isinstance(mae, VitMae)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 64, 64, generator=g)
    mask = random_patch_mask(2, 2, 2, 0.5, g)
    seen = []
    h = mae.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    r = mae(x, mask)
    h.remove()
    # 16 tokens of 16 px in a 64 px tile, half of them masked, plus the class token
    assert seen == [8 + 1] and r.shape == (2, 1, 64, 64)
    loss = masked_patch_loss(r, x, mask, 32, True)
    loss.backward()
    assert mae.vit.patch_embed.proj.weight.grad is not None


def test_patch_size_must_fit_the_encoder():
    with pytest.raises(ValueError, match="multiple of 8"):
        build_mae(_unet(), "cnn", 1, 12, 16, 1)
    with pytest.raises(ValueError, match="needs a ViT encoder"):
        build_mae(_unet(), "vit", 1, 16, 16, 1)


def test_pretrained_encoder_loads_fully_into_the_segmentation_model(demo_params):
    run_index(demo_params, progress=False)
    res = run_pretrain(demo_params, None, progress=False)["result"]
    assert res.encoder_checkpoint.is_file() and res.reconstructions.is_file()
    assert res.history and res.history[-1]["loss"] > 0
    seg = model_from_params(demo_params.model, demo_params.num_classes)
    rep = load_weights(seg, res.encoder_checkpoint, require="encoder")
    assert rep["encoder_loaded"] == rep["encoder_total"] > 0
    assert rep["loaded"] == rep["encoder_total"]  # the decoder keeps its own init
    saved = torch.load(res.encoder_checkpoint, weights_only=True)["model"]
    for k, v in saved.items():
        assert torch.equal(seg.state_dict()[f"encoder.{k}"], v)
    # another encoder: the check names the file and fails
    other = create_model("unet", "resnet34", 3, encoder_depth=3, decoder_channels=[16, 8, 8])
    with pytest.raises(ValueError, match="encoder.pt"):
        load_weights(other, res.encoder_checkpoint, require="encoder")


def test_pretraining_resumes_and_reruns_nothing(demo_params):
    run_index(demo_params, progress=False)
    first = run_pretrain(demo_params, None, progress=False)["result"]
    again = run_pretrain(demo_params, None, progress=False)["result"]
    assert first.trained and not again.trained and again.steps == first.steps
    longer = demo_params.model_copy(deep=True)
    longer.pretrain.epochs = 2
    more = run_pretrain(longer, None, progress=False)["result"]
    assert more.trained and more.steps == 2 * first.steps and len(more.history) == 2


def test_vit_encoder_pretrains_and_its_stage_loads_it(tmp_path):
    """The ViT path end to end: DPT on a timm ViT, MAE, then a stage starting from it."""
    from srpu_pipelines.config import parse_params
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.pipeline.steps import run_train
    from tests.conftest import tiny_params_dict

    d = tiny_params_dict(tmp_path)
    d["model"] = {"arch": "dpt", "encoder": "tu-vit_tiny_patch16_224", "encoder_depth": 4}
    d["stages"] = [{"name": "tune", "init": "mae", "train": {"epochs": 1}}]
    p = parse_params(d)
    generate_demo(p)
    run_index(p, progress=False)
    res = run_pretrain(p, None, progress=False)["result"]
    assert res.method == "vit" and res.steps == 2
    seg = model_from_params(p.model, p.num_classes)
    rep = load_weights(seg, res.encoder_checkpoint, require="encoder")
    assert rep["encoder_loaded"] == rep["encoder_total"] > 100
    out = run_train(p, None, progress=False)
    assert out["result"].steps == 2
