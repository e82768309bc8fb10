"""Dagster resources: where params come from, and the tracker the assets record with."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from srpu_pipelines.config import Params, load_params
from srpu_pipelines.resources.dvc import Dvc, DvcCli
from srpu_pipelines.resources.tracking import MlflowTracker, Tracker


def params_path() -> str:
    """The params file: ``$SRPU_PARAMS``, else params.yaml in the working directory."""
    return os.environ.get("SRPU_PARAMS", "params.yaml")


class ParamsResource(dg.ConfigurableResource):
    """The params file (``$SRPU_PARAMS`` or params.yaml, relative to the working
    directory) plus ``key=value`` overrides."""

    path: str = params_path()
    overrides: list[str] = []

    def load(self) -> Params:
        return load_params(Path(self.path), self.overrides)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry as set in ``params.tracking`` (SQLite file by default;
    MLFLOW_TRACKING_URI points it at a server)."""

    def tracker(self, params: Params) -> Tracker | None:
        return MlflowTracker(params.tracking) if params.tracking.enabled else None


class DvcResource(dg.ConfigurableResource):
    """DVC, called as a command line (it lives in its own environment): commits the
    labelled folders it tracks; ``push`` also sends them to the default remote."""

    push: bool = True

    def client(self) -> Dvc:
        return DvcCli(push=self.push)
