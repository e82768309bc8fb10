"""The srpu command line: help for every command, the demo pipeline, clear errors."""

import os
import subprocess
import sys

import pytest
import yaml

from srpu_pipelines.cli import main
from tests.conftest import ROOT, tiny_params_dict

COMMANDS = [
    "demo-data",
    "index",
    "pretrain",
    "train",
    "stages",
    "evaluate",
    "predict",
    "score",
    "select",
    "labels",
    "bench",
    "bench supervised",
    "bench ssl",
    "bench al",
    "bench speed",
]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd.split(), "--help"])
    assert e.value.code == 0
    assert "usage: srpu" in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run(
        [sys.executable, "-m", "srpu_pipelines.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "index" in out.stdout and "train" in out.stdout


def test_demo_pipeline_through_the_cli(tmp_path, capsys):
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))
    base = ["-q", "--params", str(pf)]
    for cmd in ("demo-data", "index", "train", "evaluate", "predict"):
        assert main([*base, cmd]) == 0, cmd
    out = capsys.readouterr().out
    assert "8 labelled pairs" in out and "best val mIoU" in out
    assert "carbon" in out and "IoU" in out  # the per-class table
    assert "1 images segmented" in out
    assert main([*base, "index"]) == 0 and "(unchanged)" in capsys.readouterr().out
    assert main([*base, "--set", "train.epochs=3", "train"]) == 0
    assert "resumed" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    pf = tmp_path / "params.yaml"
    d = tiny_params_dict(tmp_path)
    d["train"]["lr"] = "fast"
    pf.write_text(yaml.safe_dump(d))
    assert main(["--params", str(pf), "index"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err
    d["train"]["lr"] = 0.001
    pf.write_text(yaml.safe_dump(d))
    assert main(["--params", str(pf), "evaluate"]) == 2
    assert "run `srpu index` first" in capsys.readouterr().err
    assert main(["--params", str(pf), "--set", "model.encoder=resnet19", "demo-data"]) == 0
    assert main(["--params", str(pf), "--set", "model.encoder=resnet19", "index"]) == 0
    assert main(["--params", str(pf), "--set", "model.encoder=resnet19", "train"]) == 2
    assert "unknown encoder 'resnet19'" in capsys.readouterr().err


def test_a_defect_keeps_its_traceback_where_a_user_error_is_one_line(tmp_path, capsys, monkeypatch):
    """Only a UserError (a problem the user can fix) becomes one line: a ValueError from
    a bug was once printed the same way, its traceback lost."""
    import srpu_pipelines.cli as cli
    from srpu_pipelines.errors import InputError, UserError

    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))

    def defect(params, args):
        raise ValueError("math domain error")  # as numpy or a bug would raise it

    monkeypatch.setattr(cli, "cmd_index", defect)
    with pytest.raises(ValueError, match="math domain error"):
        main(["--params", str(pf), "index"])

    def mistake(params, args):
        raise InputError("data/x.png: not an image")

    monkeypatch.setattr(cli, "cmd_index", mistake)
    assert main(["--params", str(pf), "index"]) == 2
    assert capsys.readouterr().err == "srpu: error: data/x.png: not an image\n"
    for name in ("ParamsError", "BadInputError", "MaskDecodeError", "ImageReadError"):
        mod = {
            "ParamsError": "srpu_pipelines.config",
            "BadInputError": "srpu_pipelines.data.index",
            "MaskDecodeError": "srpu_pipelines.data.masks",
            "ImageReadError": "srpu_pipelines.data.imageio",
        }[name]
        assert issubclass(getattr(__import__(mod, fromlist=[name]), name), UserError)


def test_train_flags_are_set_overrides_of_the_stage(tmp_path, capsys):
    pf = tmp_path / "params.yaml"
    d = tiny_params_dict(tmp_path)
    d["stages"] = [{"name": "one", "train": {"epochs": 1}}, {"name": "two", "init": "previous"}]
    pf.write_text(yaml.safe_dump(d))
    base = ["-q", "--params", str(pf)]
    assert main([*base, "demo-data"]) == 0 and main([*base, "index"]) == 0
    # the stage's own epochs: 1 would win over --set train.epochs; --steps goes to the stage
    assert main([*base, "train", "--stage", "one", "--steps", "3"]) == 0
    assert "3 steps" in capsys.readouterr().out
    assert main([*base, "--set", "stages.0.train.max_steps=5", "train", "--stage", "one"]) == 0
    out = capsys.readouterr().out
    assert "5 steps" in out and "resumed" in out


def test_train_in_two_data_parallel_processes(tmp_path):
    """`srpu train --nproc 2` of two stages with tracking on: torchrun, gloo on 127.0.0.1,
    one process group for both stages, rank 0 alone writes, logs and registers."""
    pf = tmp_path / "params.yaml"
    d = tiny_params_dict(tmp_path)
    d["train"]["threads"] = 1
    d["tracking"]["enabled"] = True
    d["stages"] = [
        {"name": "first", "train": {"epochs": 1}},
        {"name": "second", "init": "previous", "train": {"encoder": "differential"}},
    ]
    pf.write_text(yaml.safe_dump(d))
    base = [sys.executable, "-m", "srpu_pipelines.cli", "-q", "--params", str(pf)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (["demo-data"], ["index"]):
        subprocess.run([*base, *cmd], cwd=ROOT, check=True, env=env, capture_output=True)
    out = subprocess.run(
        [*base, "train", "--nproc", "2"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("in 2 processes") == 1 and "stage second:" in out.stdout
    assert out.stdout.count("registered") == 1  # rank 0 registered the final stage once
    for stage in ("first", "second"):
        run = tmp_path / "out/train" / stage
        assert (run / "best.pt").is_file() and (run / "model_version.json").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}")
    assert len(client.search_model_versions("name='srpu-segmenter'")) == 1
    # run again: both stages are done, nothing trains or registers
    again = subprocess.run(
        [*base, "train", "--nproc", "2"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr[-2000:]
    assert len(client.search_model_versions("name='srpu-segmenter'")) == 1
