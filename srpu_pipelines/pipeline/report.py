"""What `make demo` prints at the end: the champion, its scores, and where to look."""

from __future__ import annotations

import sys
from pathlib import Path

from srpu_pipelines.config import load_params
from srpu_pipelines.io.files import read_json
from srpu_pipelines.pipeline.steps import CHAMPION
from srpu_pipelines.resources.tracking import MlflowTracker


def main(params_path: str = "params.yaml") -> int:
    params = load_params(params_path)
    lines = ["-" * 30 + " SRPU demo finished " + "-" * 30]
    if params.tracking.enabled:
        t = MlflowTracker(params.tracking)
        champ = t.get_alias(CHAMPION)
        if champ is None:
            lines.append(f"no champion in {t.uri} yet")
        else:
            lines.append(
                f"champion: {t.registered_model} version {champ.version} "
                f"(val mIoU {champ.val_miou:.4f}), models:/{t.registered_model}@champion"
            )
            run = t.client.get_run(champ.run_id)
            pre = f"eval_{params.evaluate.split}_"
            test = {
                k[len(pre + "iou.") :]: v
                for k, v in run.data.metrics.items()
                if k.startswith(pre + "iou.")
            }
            if test:
                per = ", ".join(f"{k} {v:.4f}" for k, v in test.items())
                mean = run.data.metrics.get(pre + "miou", float("nan"))
                lines.append(f"champion {params.evaluate.split} IoU: {per} (mean {mean:.4f})")
    metrics = Path(params.evaluate.out_dir) / "metrics.json"
    if metrics.is_file():
        m = read_json(metrics)
        lines.append(
            f"latest model on split {m['split']}: mIoU {m['miou']:.4f} "
            f"({metrics}, overlays in {metrics.parent / 'overlays'})"
        )
    rec = Path(params.pretrain.out_dir) / "reconstructions.png"
    if rec.is_file():
        lines.append(f"MAE encoder reconstructions (input | masked | reconstruction): {rec}")
    lines.append(f"predicted masks: {params.predict.out_dir}")
    from srpu_pipelines.active_learning.rounds import load_summary, round_folders

    rounds = round_folders(params)
    if rounds:
        n, folder = rounds[-1]
        s = load_summary(folder)
        picks = ", ".join(it["id"] for it in s["selected"])
        lines.append(f"active learning round {n}: label these next ({folder}): {picks}")
        lines.append(f"  {s['how_to']}")
        lines.append(
            "  With `make ui` running, the new_masks_sensor starts the next round once "
            f"{params.active.min_new_masks} corrected masks are in."
        )
    lines += [
        "Look at it: make ui (Dagster, http://127.0.0.1:3000), make mlflow-ui (MLflow, "
        "http://127.0.0.1:5000); the same pipeline through DVC: make repro",
        "Where the champion comes from: .venv/bin/srpu lineage",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
