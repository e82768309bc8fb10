"""The one training loop: data-parallel processes (gloo), resume, workers, compile, its
schedule, and that the package has one loop."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from srpu_pipelines.compute.distributed import launch_command
from srpu_pipelines.training.loop import EpochSampler, run_task
from tests.conftest import ROOT
from tests.loop_task import TinyTask, tiny_params

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(tmp_path, name: str, batch: int, steps: int, nproc: int = 1, *extra: str):
    out = tmp_path / name / "losses.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [str(out), str(batch), str(steps), *extra]
    if nproc > 1:  # the command `srpu train --nproc` runs, on the test's worker module
        cmd = launch_command(nproc, "tests.loop_task", args)
    else:
        cmd = [sys.executable, "-m", "tests.loop_task", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text()) if out.is_file() else None
    return proc, result


def test_two_gloo_processes_train_as_one_with_the_same_global_batch(tmp_path):
    one_proc, one = _run(tmp_path, "one", 4, 5)
    assert one_proc.returncode == 0, one_proc.stderr
    two_proc, two = _run(tmp_path, "two", 4, 5, 2)
    assert two_proc.returncode == 0, two_proc.stderr
    assert len(one["losses"]) == len(two["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)) < 1e-5
    # the control: another global batch is another run
    _, other = _run(tmp_path, "other", 2, 5)
    assert max(abs(a - b) for a, b in zip(one["losses"], other["losses"], strict=True)) > 1e-3


def test_a_data_parallel_run_resumes_after_a_crash(tmp_path):
    _, whole = _run(tmp_path, "whole", 4, 5, 2)
    crashed, _ = _run(tmp_path, "cut", 4, 5, 2, "--crash-after-epoch", "3")
    assert crashed.returncode != 0  # rank 0 died after epoch 3's checkpoint
    assert (tmp_path / "cut" / "run" / "last.pt").is_file()
    done, rest = _run(tmp_path, "cut", 4, 5, 2)
    assert done.returncode == 0, done.stderr
    assert rest["resumed"] and rest["steps"] == 5 and len(rest["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(whole["losses"][3:], rest["losses"], strict=True)) < 1e-6


def test_the_sampler_slices_each_global_batch_over_the_processes():
    from srpu_pipelines.compute.distributed import Dist

    one = list(EpochSampler(12, 4, Dist()))
    halves = [list(EpochSampler(12, 4, Dist(r, 2, r))) for r in (0, 1)]
    assert one == list(range(12))
    assert halves == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    s = EpochSampler(12, 4, Dist())
    s.set_epoch(2)
    assert list(s)[:2] == [24, 25]  # item 0 of epoch 2 is drawn from (seed, 2, 0)
    with pytest.raises(ValueError, match="multiple of the process count"):
        EpochSampler(12, 3, Dist(0, 2, 0))


@pytest.mark.workers
def test_dataloader_workers_give_the_same_run(demo_params, tmp_path):
    """The real stage (labelled crops with augmentation, semi-supervised weak/strong
    pairs): two worker processes give the very same losses as none."""
    from srpu_pipelines.config import stage_setup
    from srpu_pipelines.data.index import build_index
    from srpu_pipelines.training.trainer import train_stage

    index = build_index(demo_params, show_progress=False)
    runs = []
    for workers in (0, 2):
        p = demo_params.model_copy(deep=True)
        p.train.semi.enabled, p.train.workers = True, workers
        p.train.out_dir = tmp_path / f"w{workers}"
        runs.append(train_stage(stage_setup(p), index, progress=False))
    assert runs[0].step_losses == runs[1].step_losses and len(runs[0].step_losses) == 4
    assert [h["unlabeled_loss"] for h in runs[0].history] == [
        h["unlabeled_loss"] for h in runs[1].history
    ]


@pytest.mark.compile
def test_a_compiled_model_trains_like_the_eager_one(tmp_path):
    ref = run_task(TinyTask(tiny_params(tmp_path / "eager", 4, 3), 0), progress=False)
    lp = tiny_params(tmp_path / "compiled", 4, 3, compile="on")
    compiled = run_task(TinyTask(lp, 0), progress=False)
    diffs = [abs(a - b) for a, b in zip(ref.step_losses, compiled.step_losses, strict=True)]
    assert max(diffs) < 1e-4


def test_each_parameter_group_runs_at_its_lr_scale(tmp_path):
    seen = []

    class Scaled(TinyTask):
        def param_groups(self, module):
            first, second = list(module.children())[0], list(module.children())[2]
            return [
                {"params": list(first.parameters()), "lr_scale": 0.1},
                {"params": list(second.parameters()), "lr_scale": 1.0},
            ]

        def train_step(self, loop, module, batch):
            seen.append([g["lr"] for g in loop.opt.param_groups])
            return super().train_step(loop, module, batch)

    lp = tiny_params(tmp_path / "s", 4, 3, warmup_steps=0, min_lr_ratio=1.0)
    run_task(Scaled(lp, 0), progress=False)
    assert seen == [[pytest.approx(0.005), pytest.approx(0.05)]] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_checkpoint_names_no_device(tmp_path):
    from srpu_pipelines.models.checkpoint import read_checkpoint, save_checkpoint

    net = torch.nn.Conv2d(1, 2, 3).cuda()
    save_checkpoint(tmp_path / "m.pt", net, {"kind": "test"}, {"extra": torch.ones(1).cuda()})
    state = torch.load(tmp_path / "m.pt", weights_only=True)  # no map_location
    assert state["model"]["weight"].device.type == "cpu" and state["extra"].device.type == "cpu"
    assert read_checkpoint(tmp_path / "m.pt")[1] == {"kind": "test"}


def _functions(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.end_lineno - node.lineno + 1


def test_the_package_has_one_backward_and_short_training_functions():
    pkg = ROOT / "srpu_pipelines"
    backward = [
        f"{p.relative_to(pkg)}:{i}"
        for p in pkg.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if ".backward(" in line and not line.strip().startswith("#")
    ]
    assert len(backward) == 1 and backward[0].startswith("training/loop.py"), backward
    long = [
        f"{p.name}:{name} ({n} lines)"
        for p in (pkg / "training").glob("*.py")
        for name, n in _functions(p)
        if n > 80
    ]
    assert not long, long


def test_the_weight_average_resumes_and_is_what_is_scored(tmp_path):
    from srpu_pipelines.models.checkpoint import read_checkpoint

    scored = []

    class Averaged(TinyTask):
        def on_epoch_end(self, loop, rec):
            scored.append(loop.eval_model is loop.ema.module)
            return None

    def avg(name: str, steps: int):
        lp = tiny_params(tmp_path / name, 4, steps, ema=0.5)
        res = run_task(Averaged(lp, 0), progress=False)
        state, _ = read_checkpoint(tmp_path / name / "last.pt")
        return res, state

    straight, s = avg("straight", 4)
    avg("cut", 2)  # interrupted after 2 of its 4 steps (the same run: one fingerprint)
    resumed, r = avg("cut", 4)
    assert resumed.resumed and resumed.step_losses == straight.step_losses[2:]
    assert s["ema"]["updates"] == r["ema"]["updates"] == 4 and all(scored)
    for k, v in s["ema"]["weights"].items():
        assert torch.allclose(v, r["ema"]["weights"][k], atol=1e-12)
    # the average trails the live weights
    assert not torch.allclose(s["ema"]["weights"]["0.weight"], s["model"]["0.weight"])
