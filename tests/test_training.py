"""One training stage on tiny demo data: checkpoints, resume, validation, losses."""

import json

import pytest
import torch

from srpu_pipelines.config import stage_setup
from srpu_pipelines.data.index import build_index
from srpu_pipelines.models.checkpoint import load_model, read_checkpoint
from srpu_pipelines.training.loop import lr_factor
from srpu_pipelines.training.losses import SegLoss
from srpu_pipelines.training.trainer import train_stage as _train_stage


def train_stage(params, index, **kw):
    return _train_stage(stage_setup(params), index, **kw)


@pytest.fixture
def index(demo_params):
    return build_index(demo_params, show_progress=False)


def test_train_writes_best_last_and_metrics(demo_params, index):
    res = train_stage(demo_params, index, progress=False)
    out = demo_params.train.out_dir
    assert res.steps == 4 and res.epochs == 2 and len(res.history) == 2
    for name in ("best.pt", "best.json", "last.pt", "last.json", "train_metrics.json"):
        assert (out / name).is_file(), name
    assert 0.0 <= res.best_miou <= 1.0
    assert all(0 <= v <= 1 for v in res.history[-1]["val_iou"].values())
    model, cfg = load_model(out / "best.pt")
    assert (
        cfg["class_names"] == demo_params.class_names and cfg["normalization"] == "per_image_zscore"
    )
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 1, 64, 64))).all()


def test_interrupted_run_resumes_and_keeps_best(demo_params, index):
    first = train_stage(demo_params, index, progress=False)  # 2 epochs: "interrupted" here
    state, _ = read_checkpoint(demo_params.train.out_dir / "last.pt")
    assert state["epoch"] == 2 and state["best_score"] == pytest.approx(first.best_miou)
    longer = demo_params.model_copy(deep=True)
    longer.train.epochs = 3
    res = train_stage(longer, index, progress=False)
    assert res.resumed and res.steps == 6 and res.epochs == 3
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.best_miou >= first.best_miou
    again = train_stage(longer, index, progress=False)  # finished: nothing more to do
    assert again.steps == 6 and again.history == res.history


def test_a_warm_start_keeps_its_weights_unless_training_beats_them(demo_params, index):
    trained = demo_params.model_copy(deep=True)
    trained.train.epochs = 12  # a start that predicts more than the commonest class
    first = train_stage(trained, index, progress=False)
    start = demo_params.train.out_dir / "best.pt"

    def warm(keep: bool, folder: str, epochs: int = 1):
        p = demo_params.model_copy(deep=True)
        p.train.out_dir = demo_params.train.out_dir.parent / folder
        p.train.lr, p.train.warmup_steps, p.train.epochs = 5.0, 0, epochs  # steps that wreck it
        p.train.keep_start = keep
        return train_stage(p, index, init_weights=start, init_require="model", progress=False)

    kept, off = warm(True, "kept"), warm(False, "off")
    # the start is scored first (its score is the first run's best) and competes: the
    # wrecked epoch scores below it, so best.pt is the start itself
    score = kept.info["start_val_miou"]
    assert score == pytest.approx(first.best_miou, abs=1e-6)
    assert off.history[0]["val_miou"] < score
    assert kept.best_epoch == 0 and kept.best_miou == score
    a, _ = read_checkpoint(start)
    b, cfg = read_checkpoint(kept.best_checkpoint)
    assert cfg["epoch"] == 0 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    saved = json.loads((kept.best_checkpoint.parent / "train_metrics.json").read_text())
    assert saved["start_val_miou"] == score
    # off: the best is an epoch that trained, whatever it scores
    assert off.best_epoch == 1 and "start_val_miou" not in off.info
    # resumed for a longer run: the start is not scored again (the resumed run is past
    # step 0) and its score comes back from last.pt
    longer = warm(True, "kept", epochs=2)
    assert longer.resumed and [h["epoch"] for h in longer.history] == [1, 2]
    assert longer.info["start_val_miou"] == score
    assert longer.best_epoch in (0, 2) and (longer.best_epoch == 0) == (longer.best_miou == score)
    # an encoder alone (MAE) is no model to keep: nothing is scored before training
    p = demo_params.model_copy(deep=True)
    p.train.out_dir, p.train.keep_start = demo_params.train.out_dir.parent / "enc", True
    res = train_stage(p, index, init_weights=start, init_require="encoder", progress=False)
    assert res.best_epoch >= 1 and "start_val_miou" not in res.info


def test_resume_refuses_other_settings(demo_params, index):
    train_stage(demo_params, index, progress=False)
    other = demo_params.model_copy(deep=True)
    other.train.lr = 0.5
    with pytest.raises(ValueError, match=r"last\.pt: holds a run with other settings"):
        train_stage(other, index, progress=False)


def test_a_checkpoint_of_an_older_model_layout_starts_over(demo_params, index):
    # e.g. written before a depth-3 resnet dropped layer3/layer4: cannot resume, no crash
    train_stage(demo_params, index, progress=False)
    last = demo_params.train.out_dir / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["model"]["encoder.layer4.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, last)
    res = train_stage(demo_params, index, progress=False)
    assert not res.resumed and res.steps == 4


def test_budget_in_seconds_stops_training(demo_params, index):
    p = demo_params.model_copy(deep=True)
    p.train.budget_s, p.train.max_steps = 0.01, 10**6
    res = train_stage(p, index, progress=False)
    assert 1 <= res.steps < 10


def test_no_training_images_is_a_clear_error(demo_params, index):
    p = demo_params.model_copy(deep=True)
    p.train.splits = ["nothing"]
    with pytest.raises(ValueError, match=r"train\.splits \['nothing'\]: no labelled images"):
        train_stage(p, index, progress=False)


def test_loss_ignores_255_and_weights_classes():
    from srpu_pipelines.config import LossParams

    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    y = torch.full((1, 4, 4), 255)
    y[0, 0, 0] = 1
    loss = SegLoss(LossParams(dice_weight=0))(logits, y)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)
    loss.backward()
    assert logits.grad[0, :, 1:, 1:].abs().sum() == 0  # ignored pixels give no gradient


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0.0, 0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0.0, 10, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.5, 50, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(1.0, 99, 10, 0.1) == pytest.approx(0.1)


def test_more_input_channels_repeat_the_grey_image(demo_params, index):
    p = demo_params.model_copy(deep=True)
    p.model.in_channels = 3
    res = train_stage(p, index, progress=False)
    assert res.steps == 4 and 0 <= res.best_miou <= 1


def test_skeleton_of_a_line_is_its_centre_line_and_recall_rewards_covering_it():
    from srpu_pipelines.config import LossParams
    from srpu_pipelines.training.losses import skeleton

    y = torch.zeros(1, 48, 48, dtype=torch.long)
    y[0, 20:23, 5:40] = 1  # a crack 3 px wide, 35 px long
    sk = skeleton((y == 1).float()[:, None])[0, 0]
    assert sk[21, 8:37].all() and sk.sum() <= 37 and not sk[20].any() and not sk[22].any()
    p = LossParams(dice_weight=0, ce_weight=1, skeleton_weight=1, skeleton_classes=["b"])
    loss = SegLoss(p, ["a", "b"])
    covered = torch.full((1, 2, 48, 48), -4.0)
    covered[:, 1][y == 1] = 4.0
    covered[:, 0][y == 0] = 4.0
    missed = covered.flip(1)
    assert loss.skeleton_recall(covered, y) < 0.05 < 0.95 < loss.skeleton_recall(missed, y)
    # a batch without the class adds nothing; pixels not labelled never count
    assert loss.skeleton_recall(covered, torch.zeros_like(y)) == 0
    assert loss.skeleton_recall(missed, torch.where(y == 1, 255, y)) == 0
    with pytest.raises(ValueError, match="skeleton_classes"):
        SegLoss(p, ["a", "c"])


def test_lovasz_term_is_one_minus_iou_on_hard_predictions_and_skips_unlabelled_pixels():
    """On confident predictions the Lovasz-softmax term is the mean over present classes of
    1 - IoU; pixels labelled 255 change nothing."""
    from srpu_pipelines.config import LossParams

    y = torch.zeros(1, 8, 8, dtype=torch.long)
    y[0, :, 4:] = 1  # class 1 on the right half: 32 px
    pred = torch.zeros_like(y)
    pred[0, :, 6:] = 1  # predicted on 16 of them: IoU 0.5 (class 1), 32/48 (class 0)
    logits = torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float() * 40.0
    term = SegLoss(LossParams(ce_weight=0, dice_weight=1, lovasz_weight=1), ["a", "b"]).lovasz
    expect = ((1 - 32 / 48) + (1 - 0.5)) / 2
    assert term(logits, y).item() == pytest.approx(expect, abs=1e-4)
    unlabelled = y.clone()
    unlabelled[0, 0, :] = 255  # one row of each class not labelled: IoU 28/42, 0.5
    assert term(logits, unlabelled).item() == pytest.approx(((1 - 28 / 42) + 0.5) / 2, abs=1e-4)
    perfect = torch.nn.functional.one_hot(y, 2).permute(0, 3, 1, 2).float() * 40.0
    off = SegLoss(LossParams(ce_weight=0, dice_weight=1), ["a", "b"])
    on = SegLoss(LossParams(ce_weight=0, dice_weight=1, lovasz_weight=2), ["a", "b"])
    assert on(perfect, y).item() == pytest.approx(off(perfect, y).item(), abs=1e-4)
    assert on(logits, y).item() == pytest.approx(off(logits, y).item() + 2 * expect, abs=1e-3)
