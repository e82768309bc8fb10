"""Experiment tracking and the model registry: an interface, MLflow, and an in-memory fake.

MLflow owns models: every training run is an MLflow run (resolved params, data revision,
per-epoch metrics, checkpoint, pictures); models are registered under one name and
promoted with aliases (``challenger`` when registered, ``champion`` when promoted).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srpu_pipelines.config import TrackingParams
from srpu_pipelines.errors import MissingError, NotFoundError, RegistryError

log = logging.getLogger(__name__)
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def is_not_found(e: Exception) -> bool:
    """Does an ``MlflowException`` say "no such model / alias" (and nothing worse)?
    MLflow reports a missing model as RESOURCE_DOES_NOT_EXIST and a missing alias as
    INVALID_PARAMETER_VALUE "... alias ... not found" (SQL store and REST alike)."""
    code = getattr(e, "error_code", "")
    msg = str(getattr(e, "message", e))
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return code == "INVALID_PARAMETER_VALUE" and "alias" in msg and "not found" in msg


@dataclass
class ModelVersion:
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def val_miou(self) -> float | None:
        try:
            return float(self.tags["val_miou"])
        except (KeyError, ValueError):
            return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]  # MLflow's limit for a param value
    return out


class Tracker(abc.ABC):
    """What the pipeline needs from a tracking server and registry."""

    registered_model: str

    @abc.abstractmethod
    def start_run(
        self, name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None
    ) -> contextlib.AbstractContextManager[str]:
        """Context manager: an active run (new, or ``run_id`` resumed); yields the run id."""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    @abc.abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    @abc.abstractmethod
    def log_model(self, checkpoint: str | Path, tags: dict[str, str]) -> ModelVersion:
        """Log the checkpoint as a pyfunc model in the active run, register it, tag it."""

    @abc.abstractmethod
    def set_alias(self, alias: str, version: str) -> None: ...

    @abc.abstractmethod
    def get_alias(self, alias: str) -> ModelVersion | None: ...

    @abc.abstractmethod
    def get_version(self, version: str) -> ModelVersion | None:
        """A registered version, or None when the registry has no such version."""

    @abc.abstractmethod
    def fetch_checkpoint(self, alias: str, dest: Path) -> Path:
        """The checkpoint (.pt) of the version with ``alias``, copied under ``dest``."""

    @abc.abstractmethod
    def prune_checkpoints(self, stage: str, keep: int) -> list[str]:
        """Delete the ``checkpoint/`` artifacts of stage ``stage``'s runs older than the
        ``keep`` newest, except runs with a registered version; returns their run ids."""


def flat_metrics(prefix: str, scores: dict[str, Any]) -> dict[str, float]:
    """``{prefix}miou``, ``{prefix}iou.<class>`` ... from an evaluation dict (NaN dropped)."""
    out = {}
    for k in ("miou", "mdice", "pixel_accuracy"):
        if k in scores and scores[k] == scores[k]:
            out[f"{prefix}{k}"] = float(scores[k])
    for k in ("iou", "dice"):
        for cls, v in scores.get(k, {}).items():
            if v == v:
                out[f"{prefix}{k}.{cls}"] = float(v)
    return out


class MlflowTracker(Tracker):
    """MLflow with a SQLite default: no server needed, a real one by URI."""

    def __init__(self, p: TrackingParams, root: Path | None = None):
        root = (root or Path.cwd()).resolve()
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # one progress line per artifact file swamps the logs of a small model download
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow

        self.uri = (
            p.uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or (f"sqlite:///{(root / p.default_db).as_posix()}")
        )
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.registered_model = p.registered_model
        self._mlflow = mlflow
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; put the environment back, or
        # the next tracker built in this process would take this one's URI for the user's
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.client = mlflow.MlflowClient(self.uri, self.uri)
        exp = self.client.get_experiment_by_name(p.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):
                location = (root / p.artifact_root).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(p.experiment, location)
        else:
            self.experiment_id = exp.experiment_id

    @contextlib.contextmanager
    def start_run(self, name, params, tags, run_id=None) -> Iterator[str]:
        mlflow = self._mlflow
        with mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else self.experiment_id,
            run_name=None if run_id else name,
            tags=tags,
        ) as run:
            if params and not run_id:
                mlflow.log_params(_flatten(params))
            yield run.info.run_id

    def log_metrics(self, metrics, step=None) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path, artifact_path=None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, checkpoint, tags) -> ModelVersion:
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

        import srpu_pipelines

        # (N, H, W) of any size; tiling can be changed per call
        sig = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
            params=ParamSchema(
                [
                    ParamSpec("tile_size", "long", 256),
                    ParamSpec("overlap", "double", 0.25),
                    ParamSpec("batch_size", "long", 8),
                    # the inputs' pixel size: a model trained on resampled pixels resamples
                    # to them (0: unknown, predicted at the inputs' own pixels)
                    ParamSpec("pixel_size_nm", "double", 0.0),
                ]
            ),
        )
        run = self._mlflow.active_run()
        with warnings.catch_warnings():
            # the signature above is explicit; an input example would only re-derive it
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = self._mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(PACKAGE_DIR)],
                signature=sig,
                pip_requirements=_requirements(),
                metadata={"srpu_version": srpu_pipelines.__version__},
            )
        mv = self._mlflow.register_model(info.model_uri, self.registered_model)
        for k, v in tags.items():
            self.client.set_model_version_tag(self.registered_model, mv.version, k, str(v))
        return ModelVersion(str(mv.version), run.info.run_id, dict(tags))

    def set_alias(self, alias, version) -> None:
        self.client.set_registered_model_alias(self.registered_model, alias, version)

    def get_alias(self, alias) -> ModelVersion | None:
        """The version behind ``alias``; None only when the registry says the model or
        the alias does not exist. Any other failure (the server down, a locked or
        damaged store) raises :class:`RegistryError`: read as "no champion" it would let
        an unchecked model through the gate."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.registered_model, alias)
        except MlflowException as e:
            if is_not_found(e):
                return None  # no such model or alias yet
            raise RegistryError(
                f"model registry {self.uri}: reading {self.registered_model}@{alias} "
                f"failed ({e.error_code}: {e.message}); the step stops, nothing changed"
            ) from e
        return ModelVersion(str(mv.version), mv.run_id, dict(mv.tags or {}))

    def get_version(self, version) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.registered_model, str(version))
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(
                f"model registry {self.uri}: reading {self.registered_model} version "
                f"{version} failed ({e.error_code}: {e.message})"
            ) from e
        return ModelVersion(str(mv.version), mv.run_id, dict(mv.tags or {}))

    def prune_checkpoints(self, stage, keep) -> list[str]:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`srpu.stage` = '{stage}'",
            order_by=["attributes.start_time DESC"],
        )
        registered = {
            mv.run_id for mv in self.client.search_model_versions(f"name='{self.registered_model}'")
        }
        pruned = []
        for run in runs[keep:]:
            if run.info.run_id in registered or run.data.tags.get("srpu.pruned") == "true":
                continue
            repo = get_artifact_repository(run.info.artifact_uri)
            if any(f.path == "checkpoint" for f in repo.list_artifacts()):
                repo.delete_artifacts("checkpoint")
            self.client.set_tag(run.info.run_id, "srpu.pruned", "true")
            pruned.append(run.info.run_id)
        if pruned:
            log.info("deleted the checkpoints of %d older %s run(s)", len(pruned), stage)
        return pruned

    def fetch_checkpoint(self, alias, dest) -> Path:
        mv = self.get_alias(alias)
        if mv is None:
            raise NotFoundError(f"model {self.registered_model!r} has no {alias!r} version yet")
        # keyed by model name, version and run: another store or model reuses version numbers
        target = Path(dest) / self.registered_model / f"v{mv.version}-{mv.run_id}"
        if not target.is_dir():  # versions are immutable: a copy once fetched stays valid
            tmp = target.with_name(f".{target.name}.partial")
            if tmp.exists():
                shutil.rmtree(tmp)  # an interrupted download
            tmp.mkdir(parents=True, exist_ok=True)
            self._mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.registered_model}/{mv.version}", dst_path=str(tmp)
            )
            tmp.rename(target)
        found = sorted(target.rglob("*.pt"))
        if not found:
            raise MissingError(f"{target}: model version {mv.version} holds no checkpoint")
        return found[0]


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = [
        "torch",
        "segmentation-models-pytorch",
        "timm",
        "numpy",
        "pydantic",
        "pyyaml",
        "pillow",
        "tifffile",
        "opencv-python-headless",
        "albumentations",
        "tqdm",
        "torchmetrics",
        "mlflow",
    ]
    return [f"{p}=={version(p)}" for p in pkgs]


class RecordingTracker(Tracker):
    """In-memory fake for tests: records runs, metrics, artifacts, versions and aliases."""

    def __init__(self, registered_model: str = "srpu-test"):
        self.registered_model = registered_model
        self.runs: dict[str, dict[str, Any]] = {}
        self.versions: list[ModelVersion] = []
        self.aliases: dict[str, str] = {}
        self.checkpoints: dict[str, Path] = {}
        self._copies = tempfile.TemporaryDirectory(prefix="srpu-fake-registry-")
        self._active: str | None = None

    @contextlib.contextmanager
    def start_run(self, name, params, tags, run_id=None) -> Iterator[str]:
        rid = run_id or f"run{len(self.runs)}"
        run = self.runs.setdefault(
            rid, {"name": name, "params": params, "tags": tags, "metrics": [], "artifacts": []}
        )
        run["tags"].update(tags)
        self._active = rid
        try:
            yield rid
        finally:
            self._active = None

    def _run(self) -> dict[str, Any]:
        if self._active is None:
            raise RuntimeError("no active run")
        return self.runs[self._active]

    def log_metrics(self, metrics, step=None) -> None:
        self._run()["metrics"].append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None) -> None:
        self._run()["artifacts"].append((str(path), artifact_path))

    def log_model(self, checkpoint, tags) -> ModelVersion:
        self._run()
        mv = ModelVersion(str(len(self.versions) + 1), self._active, dict(tags))
        self.versions.append(mv)
        dest = Path(self._copies.name) / f"v{mv.version}.pt"
        shutil.copy(checkpoint, dest)  # versions are immutable, the training folder is not
        self.checkpoints[mv.version] = dest
        return mv

    def fetch_checkpoint(self, alias, dest) -> Path:
        mv = self.get_alias(alias)
        if mv is None:
            raise NotFoundError(f"model {self.registered_model!r} has no {alias!r} version yet")
        return self.checkpoints[mv.version]

    def set_alias(self, alias, version) -> None:
        self.aliases[alias] = version

    def prune_checkpoints(self, stage, keep) -> list[str]:
        registered = {m.run_id for m in self.versions}
        runs = [rid for rid, r in self.runs.items() if r["tags"].get("srpu.stage") == stage]
        pruned = []
        for rid in reversed(runs[: max(len(runs) - keep, 0)]):  # oldest last
            r = self.runs[rid]
            if rid in registered or r["tags"].get("srpu.pruned") == "true":
                continue
            r["artifacts"] = [a for a in r["artifacts"] if a[1] != "checkpoint"]
            r["tags"]["srpu.pruned"] = "true"
            pruned.append(rid)
        return pruned

    def get_alias(self, alias) -> ModelVersion | None:
        v = self.aliases.get(alias)
        return self.get_version(v) if v is not None else None

    def get_version(self, version) -> ModelVersion | None:
        return next((m for m in self.versions if m.version == str(version)), None)
