"""Training asset: one supervised stage, tracked in MLflow, registered as challenger."""

from __future__ import annotations

import dagster as dg
import numpy as np

from srpu_pipelines.assets._metadata import image_preview
from srpu_pipelines.assets.data import dataset_index
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource
from srpu_pipelines.steps import run_train


def _curve_png(history: list[dict]) -> np.ndarray:
    """Training loss and validation mIoU per epoch as an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any("val_miou" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(
            ep, [h.get("val_miou") for h in history], "s-", color="tab:orange", label="val mIoU"
        )
        ax2.set_ylabel("val mIoU")
        ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


@dg.asset(
    group_name="training",
    deps=[dataset_index],
    description="Best checkpoint of one training stage (srpu train); an MLflow run and "
    "a registered model version with alias 'challenger'.",
)
def trained_model(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    p = params.load()
    out = run_train(p, mlflow.tracker(p), progress=False)
    res = out["result"]
    last = res.history[-1] if res.history else {}
    meta = {
        "best_val_miou": res.best_miou,
        "best_epoch": res.best_epoch,
        "steps": res.steps,
        "train_seconds": round(res.train_seconds, 1),
        "checkpoint": dg.MetadataValue.path(str(res.best_checkpoint)),
    }
    if last.get("val_iou"):
        rows = ["| class | val IoU (last epoch) |", "| --- | ---: |"]
        rows += [f"| {k} | {v:.4f} |" for k, v in last["val_iou"].items()]
        meta["val_iou"] = dg.MetadataValue.md("\n".join(rows))
    if res.history:
        meta["curve"] = image_preview(_curve_png(res.history))
    if out["version"] is not None:
        meta["mlflow_run_id"] = out["record"]["run_id"]
        meta["model_version"] = out["version"].version
    return dg.MaterializeResult(metadata=meta)
