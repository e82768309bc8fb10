"""End to end on loopback: the Dagster web UI in a real (headless) browser, and the MLflow
REST API of a real tracking server. Both servers bind to 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, requires_tool, tiny_params_dict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.e2e,
    requires_tool(CHROMIUM is not None, "chromium not installed (make test installs it)"),
]
BIN = Path(sys.executable).parent
SHOTS = ROOT / "outputs" / "test-screenshots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _wait_code_location(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """The web server answers before it has loaded the code location; wait for that too."""
    query = (
        b'{"query": "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"}'
    )
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with {proc.returncode}")
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql",
            data=query,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            entries = json.load(r)["data"]["workspaceOrError"].get("locationEntries", [])
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            return
        time.sleep(1)
    raise TimeoutError(f"code location not loaded within {timeout}s")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _chromium(url: str, shot: Path) -> str:
    """Rendered DOM of ``url`` after the page's scripts ran; a screenshot saved to ``shot``.

    A fresh profile per call: a profile left locked by an earlier run makes Chromium
    return at once without rendering.
    """
    shot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="srpu-chromium-") as profile:
        flags = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1600,1000",
            "--virtual-time-budget=20000",
            f"--user-data-dir={profile}",
        ]
        subprocess.run(
            [*flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=180
        )
        out = subprocess.run(
            [*flags, "--dump-dom", url], check=True, capture_output=True, timeout=180, text=True
        )
    return out.stdout


def _render_showing(url: str, shot: Path, names: list[str], tries: int = 3) -> str:
    """The DOM once it shows every name (the first load of a graph can be slow)."""
    dom = ""
    for _ in range(tries):
        dom = _chromium(url, shot)
        if all(n in dom for n in names):
            break
    return dom


@pytest.fixture(scope="module")
def demo_instance(tmp_path_factory):
    """A Dagster instance in a temporary DAGSTER_HOME where every asset is materialised."""
    import dagster as dg

    from srpu_pipelines.config import parse_params
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.definitions import CHECKS, pipeline_assets
    from srpu_pipelines.resources.dagster_resources import (
        DvcResource,
        MlflowResource,
        ParamsResource,
    )

    tmp = tmp_path_factory.mktemp("e2e")
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    d = tiny_params_dict(tmp)
    d["tracking"]["enabled"] = True
    # the stage names of the project's params.yaml: the web server loads its assets
    d["stages"] = yaml.safe_load((ROOT / "params.yaml").read_text())["stages"]
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(d))
    generate_demo(parse_params(d))
    instance = dg.DagsterInstance.from_config(str(home))
    res = dg.materialize(
        [*pipeline_assets(parse_params(d)), *CHECKS],
        instance=instance,
        resources={
            "params": ParamsResource(path=str(params_file)),
            "mlflow": MlflowResource(),
            "dvc": DvcResource(),  # the copy's labelled folders are not DVC-tracked
        },
    )
    assert res.success
    return tmp, home, parse_params(d)


def test_dagster_ui_shows_the_assets_and_their_materialisations(demo_instance):
    tmp, home, params = demo_instance
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = _start(
        [
            str(BIN / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        env,
        tmp / "webserver.log",
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", proc)
        _wait_code_location(port, proc)
        # The global graph shows groups collapsed; each group's graph shows its asset nodes.
        groups = {
            "data": ["dataset_index"],
            "training": [
                *(["mae_encoder"] if any(s.init == "mae" for s in params.stages) else []),
                *(f"train_{s.name}" for s in params.stages),
            ],
            "evaluation": ["evaluation", "champion_model"],
            "inference": ["predictions"],
            "active_learning": ["uncertainty_scores", "selected_batch"],
        }
        for group, names in groups.items():
            url = f"http://127.0.0.1:{port}/asset-groups~group%3A%22{group}%22"
            dom = _render_showing(url, SHOTS / f"dagster_asset_graph_{group}.png", names)
            for name in names:
                assert name in dom, f"{name} not shown in the {group} asset graph"
            # every node carries its latest materialisation
            assert dom.count("Materialized") >= len(names), f"{group}: no materialisation shown"
        assert (SHOTS / "dagster_asset_graph_evaluation.png").stat().st_size > 10_000
        # the batch to label: a table inline (the previews are one click away)
        url = f"http://127.0.0.1:{port}/assets/selected_batch"
        dom = _render_showing(url, SHOTS / "dagster_selected_batch.png", ["combined score"])
        assert "combined score" in dom and "mask to correct" in dom and "_mask.png" in dom
    finally:
        _stop(proc)
    assert "0.0.0.0" not in (tmp / "webserver.log").read_text(errors="replace")


def test_mlflow_rest_api_has_the_champion(demo_instance):
    tmp, _, params = demo_instance
    port = _free_port()
    db = params.tracking.default_db
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    proc = _start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--default-artifact-root",
            str(params.tracking.artifact_root),
        ],
        env,
        tmp / "mlflow.log",
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        name = params.tracking.registered_model
        url = (
            f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/alias"
            f"?name={name}&alias=champion"
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            mv = json.load(r)["model_version"]
        assert mv["name"] == name and mv["version"] == "1"
        assert any(t["key"] == "val_miou" for t in mv.get("tags", []))
    finally:
        _stop(proc)
