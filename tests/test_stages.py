"""Multi-stage training and semi-supervised training on tiny data."""

import pytest
import torch

from srpu_pipelines.config import ParamsError, parse_params
from srpu_pipelines.data.demo import generate_demo
from srpu_pipelines.pipeline.steps import (
    final_dir,
    model_record_path,
    run_index,
    run_pretrain,
    run_train,
    stage_dir,
    stage_params,
)
from srpu_pipelines.resources.tracking import RecordingTracker
from srpu_pipelines.training.semi import fixmatch_loss, strong_augment
from srpu_pipelines.training.trainer import param_groups
from tests.conftest import tiny_params_dict

TWO_STAGES = [
    {"name": "head", "init": "mae", "train": {"encoder": "frozen", "epochs": 1}},
    {
        "name": "tune",
        "init": "previous",
        "train": {
            "encoder": "differential",
            "encoder_lr_mult": 0.1,
            "semi": {"enabled": True, "threshold": 0.5, "rampup_steps": 0},
        },
    },
]


def test_no_confident_pixel_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    flat = torch.full((2, 3, 8, 8), 1 / 3)  # the most uncertain prediction there is
    loss, share = fixmatch_loss(logits, flat, threshold=0.9)
    assert share == 0.0 and loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_confident_pixels_are_trained_towards_the_pseudo_label():
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, 1] = 1.0  # confident class 1 everywhere ...
    probs[0, :, 0, 0] = torch.tensor([0.4, 0.3, 0.3])  # ... except one pixel
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    loss, share = fixmatch_loss(logits, probs, threshold=0.9)
    assert share == 0.75
    assert loss.item() == pytest.approx(0.75 * torch.log(torch.tensor(3.0)).item(), rel=1e-5)
    loss.backward()
    assert (logits.grad[0, :, 0, 0] == 0).all() and logits.grad[0, 1, 1, 1] < 0


def test_strong_augment_keeps_shape_and_changes_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    y = strong_augment(x, 0.4, 0.25, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert ((y == 0).flatten(1).sum(1) >= 8 * 8).all()  # a cut-out square in each tile


def test_stage_keys_are_checked_and_named(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["stages"] = [{"name": "a"}, {"name": "b", "train": {"lr": -1}}]
    with pytest.raises(ParamsError, match=r"stages\.1\.train\.lr"):
        parse_params(d)
    d["stages"] = [{"name": "a", "train": {"semi": {"treshold": 0.5}}}]
    with pytest.raises(ParamsError, match=r"stages\.0\.train\.semi\.treshold: unknown key"):
        parse_params(d)
    d["stages"] = [{"name": "a", "init": "previous"}]
    with pytest.raises(ParamsError, match="needs a stage before it"):
        parse_params(d)
    d["stages"] = [{"name": "a", "init": "imagenet"}]
    with pytest.raises(ParamsError, match="alias:<registry alias>"):
        parse_params(d)
    d["stages"] = [{"name": "a"}, {"name": "a"}]
    with pytest.raises(ParamsError, match="repeated"):
        parse_params(d)


def test_stage_settings_merge_over_train(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["stages"] = TWO_STAGES
    p = parse_params(d)
    head, tune = stage_params(p, "head").train, stage_params(p, "tune").train
    assert head.epochs == 1 and tune.epochs == p.train.epochs
    assert head.batch_size == tune.batch_size == p.train.batch_size
    assert tune.semi.enabled and tune.semi.threshold == 0.5 and not head.semi.enabled
    assert stage_dir(p, "tune") == p.train.out_dir / "tune" == final_dir(p)


def test_encoder_modes_set_the_optimiser_groups(tmp_path):
    from srpu_pipelines.models.factory import create_model

    m = create_model("unet", "resnet18", 3, encoder_depth=3, decoder_channels=[16, 8, 8])
    n_enc = sum(1 for n, _ in m.named_parameters() if n.startswith("encoder."))
    diff = param_groups(m, "differential", 0.1)
    assert [g["lr_scale"] for g in diff] == [0.1, 1.0] and len(diff[0]["params"]) == n_enc
    frozen = param_groups(m, "frozen", 0.1)
    assert len(frozen) == 1 and all(not p.requires_grad for p in m.encoder.parameters())


@pytest.fixture
def two_stage(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["stages"] = TWO_STAGES
    p = parse_params(d)
    generate_demo(p)
    run_index(p, progress=False)
    run_pretrain(p, None, progress=False)
    return p


def test_two_stage_run_mae_then_previous_with_semi(two_stage):
    p, t = two_stage, RecordingTracker()
    out = run_train(p, t, progress=False)
    assert out["stage"] == "tune" and out["version"].version == "1"
    names = [r["name"] for r in t.runs.values()]
    assert names == ["train_head", "train_tune"]  # one MLflow run per stage
    assert len(t.versions) == 1  # only the final stage is registered
    # frozen stage: the encoder is exactly the MAE encoder
    enc = torch.load(p.pretrain.out_dir / "encoder.pt", weights_only=True)["model"]
    head = torch.load(stage_dir(p, "head") / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(head[f"encoder.{k}"], v) for k, v in enc.items())
    tune = torch.load(stage_dir(p, "tune") / "best.pt", weights_only=True)["model"]
    assert not all(torch.equal(tune[k], head[k]) for k in head)
    hist = out["result"].history
    assert all("confident_share" in h and "unlabeled_loss" in h for h in hist)
    assert model_record_path(p, "head").is_file() and model_record_path(p).is_file()

    # nothing changed: no stage trains, no new run
    again = run_train(p, t, progress=False)
    assert not again["result"].trained and len(t.runs) == 2

    # the first stage changes: it re-runs, and so does the stage that starts from it
    p2 = p.model_copy(deep=True)
    p2.stages[0].train["lr"] = 0.003
    out2 = run_train(p2, t, progress=False)
    assert out2["result"].trained and len(t.runs) == 4 and out2["version"].version == "2"


def test_a_stage_whose_start_is_missing_says_what_to_run(two_stage):
    p = two_stage
    with pytest.raises(FileNotFoundError, match="srpu train --stage head"):
        run_train(p, None, progress=False, stage="tune")


def test_class_balance_lifts_the_rare_pseudo_class():
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0] = 1.0
    probs[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # one confident pixel of the rare class
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    plain, _ = fixmatch_loss(logits, probs, 0.9)
    balanced, share = fixmatch_loss(logits, probs, 0.9, class_balance=True)
    assert share == 1.0 and balanced.item() == pytest.approx(plain.item())  # mean weight 1
    balanced.backward()
    g = logits.grad.abs()
    rare = g[0, :, 0, 0].sum()
    # the rare pixel weighs 15x one common pixel: as much as all 15 of them together
    assert rare == pytest.approx((g.sum() - rare).item(), rel=1e-4)
