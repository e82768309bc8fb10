"""Import and train on the real SEM micrographs in ../shared/data/nasa-super (tiny budget)."""

import pytest

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.config import load_params, stage_setup
from srpu_pipelines.data.index import build_index
from srpu_pipelines.training.trainer import train_stage
from tests.conftest import NASA, ROOT

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (NASA / "labeled").is_dir(),
        reason=f"real SEM data not found at {NASA} (shared/data/nasa-super)",
    ),
]


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nasa")
    return load_params(
        ROOT / "bench" / "nasa-super.yaml",
        [
            f"data.datasets.0.labeled={NASA / 'labeled'}",
            f"data.datasets.1.labeled={NASA / 'different_test'}",
            f"data.split.split_file={NASA / 'split.json'}",
            f"data.index_path={tmp / 'index.json'}",
            f"train.out_dir={tmp / 'train'}",
            f"evaluate.out_dir={tmp / 'eval'}",
            "train.epochs=1",
            "train.steps_per_epoch=2",
            "train.batch_size=2",
            "train.tile_size=128",
            "train.val_split=nothing",
            "model.encoder_depth=3",
            "model.decoder_channels=[16,8,8]",
        ],
    )


def test_index_reads_the_published_split_and_painted_masks(params):
    idx = build_index(params, show_progress=False)
    c = idx["counts"]
    assert (c["labeled"], c["train"], c["val"], c["test"], c["different_test"]) == (23, 10, 4, 4, 5)
    assert any(" " in it["name"] for it in idx["items"])  # the name with spaces
    for it in idx["items"]:
        assert (it["height"], it["width"]) == (512, 512)
        m, s, t = it["class_fractions"]
        assert 0.3 < m < 0.8 and 0.2 < s < 0.7 and t < 0.1, it["id"]


def test_tiny_training_and_evaluation(params):
    idx = build_index(params, show_progress=False)
    res = train_stage(stage_setup(params), idx, progress=False)
    assert res.steps == 2
    m = evaluate_checkpoint(
        params, idx, res.best_checkpoint, split="different_test", progress=False
    )
    assert m["images"] == 5 and set(m["iou"]) == {"matrix", "secondary", "tertiary"}
