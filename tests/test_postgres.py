"""Real servers: a PostgreSQL (Debian's package, started and stopped here on 127.0.0.1, run
as the `postgres` user: it refuses to run as root) holds MLflow's backend store and the
Dagster instance's storage (dagster-postgres); a training stage runs through Dagster
with both, and the champion loads from `models:/srpu-segmenter@champion` on it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import requires_tool, tiny_params_dict

BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
try:
    import dagster_postgres  # noqa: F401
    import psycopg2  # noqa: F401

    DRIVERS = True
except ImportError:
    DRIVERS = False

pytestmark = [
    pytest.mark.postgres,
    requires_tool(BIN is not None, "PostgreSQL not installed (make test installs Debian's)"),
    requires_tool(DRIVERS, "dagster-postgres / psycopg2 missing: run `make setup`"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str) -> list[str]:
    if os.geteuid() != 0:
        return list(cmd)  # already an unprivileged user: PostgreSQL runs as it
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away cluster on 127.0.0.1:PORT with databases mlflow and dagster."""
    root = Path(tempfile.mkdtemp(prefix="srpu-pg-"))
    root.chmod(0o755)  # the postgres user must reach its data folder inside
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for d in (data, sock):
            os.chown(d, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    run = lambda *c: subprocess.run(  # noqa: E731
        _as_postgres(*c), check=True, capture_output=True, text=True, timeout=120
    )
    run(f"{BIN}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
    conf = f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off"
    run(f"{BIN}/pg_ctl", "-D", str(data), "-o", conf, "-l", str(sock / "log"), "-w", "start")
    try:
        for db in ("mlflow", "dagster"):
            run(f"{BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db)
        yield {"host": "127.0.0.1", "port": port, "user": "postgres"}
        log = (sock / "log").read_text(errors="replace")
        assert "0.0.0.0" not in log and 'listening on IPv4 address "127.0.0.1"' in log
    finally:
        subprocess.run(
            _as_postgres(f"{BIN}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_a_stage_trains_through_dagster_with_mlflow_and_dagster_on_postgresql(
    postgres, tmp_path, monkeypatch
):
    import dagster as dg
    import mlflow

    from srpu_pipelines.config import parse_params
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.definitions import CHECKS, pipeline_assets
    from srpu_pipelines.resources.dagster_resources import (
        DvcResource,
        MlflowResource,
        ParamsResource,
    )

    pg = postgres
    uri = f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/mlflow"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tiny_params_dict(tmp_path)
    d["tracking"].update(enabled=True, uri=uri)
    d["stages"] = [{"name": "supervised", "init": "random"}]
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(d))
    p = parse_params(d)
    generate_demo(p)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "telemetry": {"enabled": False},
                # the URL names psycopg2: SQLAlchemy 2.1 takes a bare postgresql:// to
                # psycopg 3, whose NOTIFY dagster-postgres 0.29 cannot send
                "storage": {
                    "postgres": {
                        "postgres_url": f"postgresql+psycopg2://{pg['user']}@{pg['host']}:"
                        f"{pg['port']}/dagster"
                    }
                },
            }
        )
    )
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        res = dg.materialize(
            [*pipeline_assets(p), *CHECKS],
            instance=instance,
            resources={
                "params": ParamsResource(path=str(pf)),
                "mlflow": MlflowResource(),
                "dvc": DvcResource(),  # the labelled folders are not DVC-tracked here
            },
        )
        assert res.success
        (run,) = instance.get_runs()  # the run is in PostgreSQL
        assert run.status == dg.DagsterRunStatus.SUCCESS
        for key in ("train_supervised", "champion_model"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
    finally:
        instance.dispose()
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{p.tracking.registered_model}@champion")
    labels = model.predict(np.random.default_rng(0).random((1, 64, 64), dtype=np.float32))
    assert labels.shape == (1, 64, 64) and labels.max() < p.num_classes
