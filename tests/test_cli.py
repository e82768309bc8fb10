"""The srpu command line: help for every command, the demo pipeline, clear errors."""

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
