"""MLflow pyfunc "model from code" for an SRPU checkpoint: no pickle, any image size.

MLflow runs this file when the model is loaded. The network is rebuilt from the JSON
config stored in the checkpoint and its ``state_dict`` is loaded with
``weights_only=True``; nothing is unpickled. (MLflow's default PyTorch format, torch.export,
would fix the input size to that of the example.)

Input: float32 (N, H, W) or (H, W) micrographs in [0, 1], any H and W.
Output: int64 (N, H, W) class indices. ``params``: tile_size, overlap, batch_size, and
pixel_size_nm (the inputs' pixel size: a model trained on resampled pixels, ``resample_nm``
in its config, resamples the images to them and its probabilities back; 0 = unknown, the
images' own pixels). A model trained on enlarged images (``upsample`` in its config)
enlarges the inputs alike, whatever their pixel size.
"""

from __future__ import annotations

import mlflow
import numpy as np


class SrpuSegmenter(mlflow.pyfunc.PythonModel):
    def load_context(self, context):  # noqa: ANN001 (MLflow reads type hints as a schema)
        from srpu_pipelines.models.checkpoint import load_model

        self.model, self.config = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (see load_context)
        from srpu_pipelines.analysis.inference import input_scale, predict_labels
        from srpu_pipelines.data.dataset import standardize

        p = {"tile_size": 256, "overlap": 0.25, "batch_size": 8, **(params or {})}
        scale = input_scale(self.config, float(p.get("pixel_size_nm") or 0.0) or None)
        x = np.asarray(model_input, dtype=np.float32)
        single = x.ndim == 2
        batch = x[None] if single else x
        out = np.stack(
            [
                predict_labels(
                    self.model,
                    standardize(img),
                    scale,
                    tile=int(p["tile_size"]),
                    overlap=float(p["overlap"]),
                    batch_size=int(p["batch_size"]),
                    in_channels=int(self.config["in_channels"]),
                ).astype(np.int64)
                for img in batch
            ]
        )
        return out[0] if single else out


mlflow.models.set_model(SrpuSegmenter())
