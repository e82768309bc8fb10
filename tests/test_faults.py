"""Fault injection: a real `srpu` child process killed with SIGKILL inside an operation.

Each kill point is a named ``fault_point`` (srpu_pipelines/io/faults.py): the child stops
there and writes a marker, the test sees the marker (the operation has begun), kills the
child with SIGKILL, asserts the partial state it left (a temp file beside the old one, a
version without an alias, half a line), then reruns the step, which resumes or redoes
it. Every test ends with: no label lost or changed (hashes of the labelled folders), no
duplicate picks, and the registry consistent (no alias on a version that was not
checked)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from srpu_pipelines.config import parse_params
from srpu_pipelines.io.files import sha256_file
from tests.conftest import ROOT, requires_tool, tiny_params_dict

pytestmark = pytest.mark.faults
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
for k in ("SRPU_FAULT_POINT", "SRPU_FAULT_SKIP", "SRPU_FAULT_MARKER", "MLFLOW_TRACKING_URI"):
    ENV.pop(k, None)


def _project(tmp_path: Path, **over):
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.pipeline.steps import run_index

    d = tiny_params_dict(
        tmp_path,
        **{
            "train.threads": 1,
            "data.split.record": str(tmp_path / "demo/labeled/splits.json"),
            **over,
        },
    )
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(d))
    p = parse_params(d)
    generate_demo(p)
    run_index(p, progress=False)
    return pf, p


def _cmd(pf: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "srpu_pipelines.cli", "-q", "--params", str(pf), *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd[3:]} failed:\n{out.stderr[-3000:]}"
    return out


def _kill_at(cmd: list[str], cwd: Path, point: str, skip: int = 0) -> None:
    """Run ``cmd`` until it reaches ``point`` (its ``skip``-th pass), then SIGKILL it."""
    marker = cwd / f"reached-{point.replace(':', '_')}"
    marker.unlink(missing_ok=True)
    env = {**ENV, "SRPU_FAULT_POINT": point, "SRPU_FAULT_SKIP": str(skip)}
    env["SRPU_FAULT_MARKER"] = str(marker)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not marker.is_file():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(
                f"{point}: the child ended (rc {proc.returncode}) before it:\n{err[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{point}: not reached in 300 s")
        time.sleep(0.05)
    assert marker.read_text().split()[0] == point
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _labels(p) -> dict[str, str]:
    """Every file of the labelled folders by its hash (the splits record excluded: the
    index rewrites it by design)."""
    out = {}
    for d in p.data.datasets:
        for f in sorted(Path(d.labeled).rglob("*")):
            if f.is_file():
                out[str(f)] = sha256_file(f)
    return out


def _temps(folder: Path, name: str) -> list[Path]:
    stem, suffix = Path(name).stem, Path(name).suffix
    return [f for f in folder.glob(f".{stem}.*{suffix}") if f.is_file()]


def test_training_killed_mid_epoch_in_checkpoint_writes_and_before_aliases(tmp_path):
    """Kill points: train:step (mid-epoch), write:best.pt, write:last.pt, registry:alias,
    promote:alias; each rerun resumes or redoes the step."""
    from srpu_pipelines.pipeline.steps import final_dir
    from srpu_pipelines.resources.tracking import MlflowTracker

    pf, p = _project(tmp_path, **{"tracking.enabled": True, "train.checkpoint_every_s": 0})
    labels = _labels(p)
    tracker = MlflowTracker(p.tracking, root=tmp_path)
    name = tracker.registered_model

    def versions() -> list:
        return tracker.client.search_model_versions(f"name='{name}'")

    folder = final_dir(p)
    _kill_at(_cmd(pf, "train"), tmp_path, "write:best.pt")  # epoch 1's first best.pt
    assert _temps(folder, "best.pt") and not (folder / "best.pt").exists()
    _kill_at(_cmd(pf, "train"), tmp_path, "write:last.pt")  # best.pt is written first
    assert _temps(folder, "last.pt") and not (folder / "last.pt").exists()
    state = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    assert "model" in state  # whole
    _kill_at(_cmd(pf, "train"), tmp_path, "train:step", skip=2)  # epoch 2, its 1st step
    assert (folder / "last.pt").is_file() and not versions()  # epoch 1 saved, nothing registered
    _kill_at(_cmd(pf, "train"), tmp_path, "registry:alias")
    (v1,) = versions()
    assert not v1.aliases  # registered, no alias: never checked, never promoted
    _run(_cmd(pf, "train"), tmp_path)  # the run is finished: it registers again, aliases it
    challenger = tracker.get_alias("challenger")
    assert challenger is not None and tracker.get_alias("champion") is None
    _kill_at(_cmd(pf, "promote"), tmp_path, "promote:alias")
    assert tracker.get_alias("champion") is None
    assert not (Path(p.evaluate.out_dir) / "promotion.json").is_file()
    _run(_cmd(pf, "promote"), tmp_path)
    assert tracker.get_alias("champion").version == challenger.version
    by_version = {v.version: v.aliases for v in versions()}
    assert by_version[v1.version] == []  # the unchecked version carries no alias
    torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    assert _labels(p) == labels


def test_pretraining_killed_mid_run_resumes(tmp_path):
    """Kill points: write:encoder.pt, pretrain:step (MAE)."""
    pf, p = _project(tmp_path, **{"pretrain.epochs": 2, "pretrain.checkpoint_every_s": 0})
    labels = _labels(p)
    out = Path(p.pretrain.out_dir)
    _kill_at(_cmd(pf, "pretrain"), tmp_path, "write:encoder.pt")  # epoch 1's checkpoint
    assert _temps(out, "encoder.pt") and not (out / "encoder.pt").is_file()
    assert not (out / "last.pt").is_file()  # the encoder is written first
    _kill_at(_cmd(pf, "pretrain"), tmp_path, "pretrain:step", skip=2)  # in epoch 2
    assert (out / "last.pt").is_file() and (out / "encoder.pt").is_file()
    _run(_cmd(pf, "pretrain"), tmp_path)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["finished"] and last["step"] == 4  # resumed at step 2, ran to the end
    torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)
    assert _labels(p) == labels


def test_the_index_killed_while_writing_keeps_the_old_index_and_every_split(tmp_path):
    """Kill points: write:splits.json (the versioned split record), write:index.json."""
    from srpu_pipelines.data.index import load_index, read_split_record
    from tests.test_sensor import _drop_pair

    pf, p = _project(tmp_path)
    before = {it["id"]: it["split"] for it in load_index(p.data.index_path)["items"]}
    _drop_pair(p, "new one")
    labels = _labels(p)
    record = Path(p.data.split.record)
    _kill_at(_cmd(pf, "index"), tmp_path, "write:splits.json")
    assert _temps(record.parent, "splits.json")
    assert read_split_record(record) == before  # the old record, whole
    _kill_at(_cmd(pf, "index"), tmp_path, "write:index.json")
    assert _temps(Path(p.data.index_path).parent, "index.json")
    old = load_index(p.data.index_path)  # the old index, whole
    assert {it["id"] for it in old["items"]} == set(before)
    _run(_cmd(pf, "index"), tmp_path)
    after = {it["id"]: it["split"] for it in load_index(p.data.index_path)["items"]}
    assert {k: after[k] for k in before} == before and after["a/new one"] == "train"
    assert _labels(p) == labels


def test_scoring_and_a_round_folder_killed_midway_resume_without_duplicate_picks(tmp_path):
    """Kill points: score:image (after the 2nd image), round:item (after the 1st item)."""
    from srpu_pipelines.active_learning.rounds import round_folders
    from srpu_pipelines.active_learning.scoring import scores_dir

    pf, p = _project(tmp_path, **{"demo.pool_per_dataset": 3})
    labels = _labels(p)
    _kill_at(_cmd(pf, "score"), tmp_path, "score:image", skip=1)
    records = [f for f in scores_dir(p).glob("*.json") if f.name != "summary.json"]
    assert len(records) == 2 and not (scores_dir(p) / "summary.json").is_file()
    res = _run(_cmd(pf, "score"), tmp_path)
    assert "2 kept" in res.stdout, res.stdout
    _kill_at(_cmd(pf, "select"), tmp_path, "round:item")
    folder = Path(p.active.out_dir) / "rounds/round_001"
    assert folder.is_dir() and not (folder / "selection_summary.json").is_file()
    assert round_folders(p) == []  # not handed over: no summary
    _run(_cmd(pf, "select"), tmp_path)
    ((n, f),) = round_folders(p)
    import json

    picks = [s["id"] for s in json.loads((f / "selection_summary.json").read_text())["selected"]]
    assert n == 1 and len(picks) == len(set(picks)) == p.active.batch_size
    images = [x for x in f.rglob("*") if x.is_file() and x.parent.name != "predicted"]
    names = {x.name for x in images if not x.name.endswith((".json", ".txt"))}
    assert len(names) == len(picks)  # one image per pick (a cold start: no mask yet)
    assert _labels(p) == labels


def test_the_history_append_killed_midway_leaves_a_torn_line_that_is_redone(tmp_path):
    """Kill point: history:append (half a line written)."""
    from srpu_pipelines.active_learning.history import history_path, read_history

    pf, p = _project(tmp_path)
    labels = _labels(p)
    script = (
        "import sys; from srpu_pipelines.config import load_params; "
        "from srpu_pipelines.active_learning.history import append_history, next_round, "
        "read_history; p = load_params(sys.argv[1]); "
        "append_history(p, {'round': next_round(read_history(p)), 'corrected': []})"
    )
    append = [sys.executable, "-c", script, str(pf)]
    _run(append, tmp_path)
    _kill_at(append, tmp_path, "history:append")
    raw = history_path(p).read_bytes()
    assert not raw.endswith(b"\n")  # torn: half a line
    assert [h["round"] for h in read_history(p)] == [1]
    _run(append, tmp_path)
    assert [h["round"] for h in read_history(p)] == [1, 2]  # unique, the torn one redone
    assert _labels(p) == labels


DVC = Path(sys.executable).parent / "dvc"


@requires_tool(DVC.exists(), f"{DVC} missing: run `make setup`")
def test_labels_killed_between_dvc_add_and_push_are_pushed_on_the_rerun(tmp_path):
    """Kill point: dvc:push (after `dvc add`, before `dvc push`)."""
    pf, p = _project(tmp_path)
    labels = _labels(p)
    dvc = DVC
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True, env=ENV)
    remote = tmp_path / "remote"
    subprocess.run([str(dvc), "remote", "add", "-d", "r", str(remote)], cwd=tmp_path, check=True)
    labeled = Path(p.data.datasets[0].labeled).parent
    push = [
        sys.executable,
        "-c",
        "import sys; from pathlib import Path; from srpu_pipelines.resources.dvc import DvcCli; "
        "DvcCli().add([Path(sys.argv[1])])",
        str(Path(p.data.datasets[0].labeled)),
    ]
    subprocess.run([str(dvc), "add", "-q", str(labeled)], cwd=tmp_path, check=True, env=ENV)
    _kill_at(push, tmp_path, "dvc:push")
    assert not remote.exists() or not any(f.is_file() for f in remote.rglob("*"))
    _run(push, tmp_path)
    assert any(f.is_file() for f in remote.rglob("*"))  # pushed on the rerun
    assert _labels(p) == labels
