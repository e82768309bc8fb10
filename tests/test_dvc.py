"""`dvc repro` runs the same stages as Dagster; a second repro does nothing; one changed
param re-runs only what depends on it. Runs in a copy of the project with tiny params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, requires_tool, tiny_params_dict

DVC = Path(sys.executable).parent / "dvc"
pytestmark = requires_tool(DVC.exists(), f"{DVC} missing: run `make setup`")


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{DVC.parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(
        [str(DVC), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tracked files of this project, with the demo data made tiny (and not DVC-tracked)."""
    from srpu_pipelines.config import parse_params
    from srpu_pipelines.data.demo import generate_demo

    dst = tmp_path_factory.mktemp("dvcproj") / "srpu"
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if f.startswith("data/") or not (ROOT / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    base = tiny_params_dict(Path("."))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # same keys as the real params.yaml, small values; demo folders stay where dvc.yaml says
    params["model"].update(base["model"])
    params["train"].update({k: v for k, v in base["train"].items() if k != "out_dir"})
    params["inference"].update(base["inference"])
    params["pretrain"].update({k: v for k, v in base["pretrain"].items() if k != "out_dir"})
    params["active"].update({k: v for k, v in base["active"].items() if k != "out_dir"})
    params["demo"].update(
        {k: v for k, v in base["demo"].items() if k not in ("out_dir", "datasets")}
    )
    params["tracking"]["enabled"] = True
    # two stages, the first from the MAE encoder: what a user who switches pretraining on
    # runs (the shipped params have one stage), and a stage after a stage to re-run alone
    params["stages"] = MULTI_STAGE
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(dst)
    try:
        p = parse_params(params)
        generate_demo(p)
        from srpu_pipelines.pipeline.dvc_stages import sync_dvc_yaml

        assert sync_dvc_yaml(p, dst / "dvc.yaml", write=True)  # `srpu stages --write-dvc`
    finally:
        os.chdir(cwd)
    return dst


MULTI_STAGE = [
    {"name": "decoder", "init": "mae", "train": {"encoder": "frozen", "epochs": 3}},
    {"name": "finetune", "init": "previous", "train": {"encoder": "differential"}},
]
SHIPPED = [
    "dataset_index",
    "train_supervised",
    "evaluation",
    "champion_model",
    "predictions",
    "microstructure",
    "uncertainty_scores",
    "selected_batch",
]
STAGES = [SHIPPED[0], "mae_encoder", "train_decoder", "train_finetune", *SHIPPED[2:]]


def test_committed_dvc_yaml_is_in_step_with_params_yaml():
    from srpu_pipelines.config import load_params
    from srpu_pipelines.pipeline.dvc_stages import dvc_stages, sync_dvc_yaml

    p = load_params(ROOT / "params.yaml")
    assert not sync_dvc_yaml(p, ROOT / "dvc.yaml", write=False), "run `srpu stages --write-dvc`"
    assert list(dvc_stages(p)) == SHIPPED  # the Dagster asset names, in order


def test_repro_runs_then_is_idempotent_then_reruns_only_what_changed(project):
    out = _dvc(project, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out
    assert (project / "outputs/predictions").is_dir()
    assert "up to date" in _dvc(project, "status") or "Data and pipelines are up to date" in _dvc(
        project, "status"
    )
    again = _dvc(project, "repro")
    assert "Running stage" not in again, again
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["evaluate"]["overlays"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    third = _dvc(project, "repro")
    ran = [s for s in STAGES if f"Running stage '{s}'" in third]
    assert ran == ["evaluation"], third
    # one stage's setting: DVC re-runs every train stage (the `stages` param changed);
    # the unchanged first stage finds its finished run (its outputs persist) and trains
    # nothing, the changed one trains again
    before = (project / "outputs/train/decoder/best.pt").read_bytes()
    p["stages"][1]["train"]["lr"] = 0.001
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    fourth = _dvc(project, "repro")
    assert "Running stage 'train_finetune'" in fourth, fourth
    assert (project / "outputs/train/decoder/best.pt").read_bytes() == before
    assert (project / "outputs/train/decoder/train_metrics.json").is_file()
    assert "metrics.json" in _dvc(project, "metrics", "show") or "miou" in _dvc(
        project, "metrics", "show"
    )


def _fresh_copy(project: Path, tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """(a copy of the project without outputs, an environment with its own Dagster
    instance, that instance's home)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    fresh = tmp_path / "srpu"
    shutil.copytree(project, fresh, ignore=shutil.ignore_patterns("outputs", "mlruns"))
    return fresh, {**os.environ, "DAGSTER_HOME": str(home)}, home


def test_dagster_cli_materializes_with_a_string_selection(project, tmp_path):
    """Users type `dagster asset materialize --select '*'`: string selections go through
    Dagster's ANTLR parser, which breaks with the ANTLR 4.9 that DVC's hydra pins."""
    # a fresh copy: the DVC tests' last model may rightly fail the champion gate there
    project, env, _ = _fresh_copy(project, tmp_path)
    out = subprocess.run(
        [
            str(DVC.parent / "dagster"),
            "asset",
            "materialize",
            "--select",
            "*",
            "-m",
            "srpu_pipelines.definitions",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    for asset in STAGES:
        assert f"Materialized value {asset}" in log, asset
    assert "RUN_SUCCESS" in log


def test_the_demo_run_prints_a_line_per_step_and_logs_dagster_to_a_file(project, tmp_path):
    """`make demo`'s run: `dg launch` (the current command) with Dagster's own log in a
    file, one line per step on screen, then the report: at most 40 lines in all."""
    fresh, env, home = _fresh_copy(project, tmp_path)
    py = str(DVC.parent / "python")
    run = subprocess.run(
        [py, "-m", "srpu_pipelines.pipeline.demo_run", "--select", "*"],
        cwd=fresh,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = subprocess.run(
        [py, "-m", "srpu_pipelines.pipeline.report"],
        cwd=fresh,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [ln for ln in (run.stdout + report.stdout).splitlines() if ln.strip()]
    assert len(lines) <= 40, "\n".join(lines)
    for asset in STAGES:
        assert any(ln.split()[:2] == ["ok", asset] for ln in lines), (asset, lines)
    assert "the run finished in" in run.stdout and "champion: " in report.stdout
    log = (fresh / "outputs/demo/dagster.log").read_text()
    assert "RUN_SUCCESS" in log and "DEBUG" in log  # Dagster's own lines: in the file
    assert "DEBUG" not in run.stdout


def test_the_dagster_ui_shows_a_running_stages_epochs(project, tmp_path):
    """Through the web UI's own GraphQL API (dagster-webserver on 127.0.0.1): while the
    run is STARTED, the training stage's asset already lists its per-epoch observations."""
    import json
    import time
    import urllib.request

    from tests.test_servers_e2e import _free_port, _stop, _wait_code_location, _wait_http

    fresh, env, _ = _fresh_copy(project, tmp_path)
    port = _free_port()
    web = subprocess.Popen(
        [
            str(DVC.parent / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            "srpu_pipelines.definitions",
        ],
        cwd=fresh,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def gql(query: str) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["data"]

    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", web)
        _wait_code_location(port, web)
        cmd = [
            str(DVC.parent / "dg"),
            "launch",
            "--assets",
            "*",
            "-m",
            "srpu_pipelines.definitions",
        ]
        run = subprocess.Popen(
            cmd, cwd=fresh, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        seen = None
        deadline = time.monotonic() + 600
        while seen is None and run.poll() is None and time.monotonic() < deadline:
            data = gql(
                '{ assetOrError(assetKey: {path: ["train_decoder"]}) { ... on Asset { '
                "assetObservations(limit: 5) { runId stepKey metadataEntries { label } } } } }"
            )
            obs = (data.get("assetOrError") or {}).get("assetObservations") or []
            if obs:
                status = gql(
                    f'{{ runOrError(runId: "{obs[0]["runId"]}") {{ ... on Run {{ status }} }} }}'
                )["runOrError"]["status"]
                seen = (obs[0], status)
            time.sleep(0.3)
        assert run.wait(timeout=600) == 0
    finally:
        _stop(web)
    assert seen is not None, "the UI showed no per-epoch observation while the run went"
    ob, status = seen
    assert status == "STARTED" and ob["stepKey"] == "train_decoder"
    labels = {m["label"] for m in ob["metadataEntries"]}
    assert {"step", "total_steps", "loss", "steps_per_s", "eta_s"} <= labels
