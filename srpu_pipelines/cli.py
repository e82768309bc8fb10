"""``srpu`` command line: each subcommand reads params.yaml and calls one core function.

    srpu [--params params.yaml] [--set key=value ...] COMMAND [options]

Errors a user can fix (bad params, bad input files, missing checkpoints) print one clear
message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from srpu_pipelines.config import Params, ParamsError, load_params
from srpu_pipelines.errors import InputError


def _table(metrics: dict[str, Any], title: str) -> str:
    names = list(metrics["iou"])
    w = max(len(n) for n in [*names, "mean"]) + 2
    lines = [title, f"{'class':<{w}}{'IoU':>8}{'Dice':>8}"]
    for n in names:
        lines.append(f"{n:<{w}}{metrics['iou'][n]:>8.4f}{metrics['dice'][n]:>8.4f}")
    lines.append(f"{'mean':<{w}}{metrics['miou']:>8.4f}{metrics['mdice']:>8.4f}")
    return "\n".join(lines)


def cmd_demo_data(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.data.demo import generate_demo

    res = generate_demo(params)
    print(
        f"demo data in {params.demo.out_dir}: {res['written']} files written, "
        f"{res['kept']} already there (kept)"
    )
    return 0


def _tracker(params: Params):
    """The MLflow tracker of ``params.tracking``, or None where tracking is off (and in a
    data-parallel worker other than rank 0: only rank 0 tracks)."""
    from srpu_pipelines.compute.distributed import is_main_process

    if not params.tracking.enabled or not is_main_process():
        return None
    from srpu_pipelines.resources.tracking import MlflowTracker

    return MlflowTracker(params.tracking)


def _text(value: object) -> str:
    """A flag's value as a YAML string: an override value is read as YAML, where
    ``runs #2`` would lose its end and ``2023`` or ``yes`` would stop being text."""
    return json.dumps(str(value))


def _stage_indices(params: Params, stage: str | None) -> list[int]:
    if stage is None:
        return list(range(len(params.stages)))
    params.stage(stage)  # an unknown name lists the stages
    return [i for i, st in enumerate(params.stages) if st.name == stage]


def train_aliases(args: argparse.Namespace, params: Params) -> list[str]:
    """``srpu train`` flags as the ``--set`` overrides they stand for. A stage's own
    ``train:`` keys win over ``--set train.KEY``, so budgets go to the stages."""
    out = []
    if args.out:
        out.append(f"train.out_dir={_text(args.out)}")
    if args.init:
        if not args.stage and len(params.stages) > 1:
            raise ParamsError("--init applies to one stage: give --stage NAME as well")
        init = _text(f"file:{args.init}")
        out += [f"stages.{i}.init={init}" for i in _stage_indices(params, args.stage)]
    for flag, key in ((args.budget_s, "budget_s"), (args.steps, "max_steps")):
        if flag is not None:
            out += [f"stages.{i}.train.{key}={flag}" for i in _stage_indices(params, args.stage)]
    return out


def pretrain_aliases(args: argparse.Namespace, params: Params) -> list[str]:
    out = []
    if args.budget_s is not None:
        out.append(f"pretrain.budget_s={args.budget_s}")
    if args.steps is not None:
        out.append(f"pretrain.max_steps={args.steps}")
    return out


def section_aliases(section: str, flags: dict[str, str]):
    """Flags that stand for keys of one params section: ``{flag attribute: key}``."""

    def aliases(args: argparse.Namespace, params: Params) -> list[str]:
        return [
            f"{section}.{key}={_text(getattr(args, attr))}"
            for attr, key in flags.items()
            if getattr(args, attr, None) is not None
        ]

    return aliases


def cmd_index(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.steps import run_index

    res = run_index(params, progress=not args.quiet)
    idx = res["index"]
    c = idx["counts"]
    splits = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("labeled", "pool", "skipped"))
    print(
        f"{params.data.index_path}: {c['labeled']} labelled pairs ({splits}), "
        f"{c['pool']} pool images, {c['skipped']} skipped"
        f"{'' if res['changed'] else ' (unchanged)'}"
    )
    snapped = [(it["id"], it.get("snapped_pixels", 0)) for it in idx["items"]]
    snapped = [(n, k) for n, k in snapped if k]
    if snapped:
        print(
            f"  {sum(k for _, k in snapped)} mask pixels in {len(snapped)} masks snapped to a "
            f"class colour within mask.color_tolerance {params.mask.color_tolerance} "
            f"(most: {max(snapped, key=lambda t: t[1])[0]})"
        )
    for s in idx["skipped"]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


def cmd_train(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.compute.distributed import from_env
    from srpu_pipelines.pipeline.steps import run_train

    if args.nproc > 1 and not from_env().active:
        from srpu_pipelines.pipeline.launch import launch_train

        return launch_train(
            params,
            args.params,
            args.set + args.alias_overrides,
            _tracker(params),
            args.nproc,
            stage=args.stage,
            quiet=args.quiet,
        )
    out = run_train(params, _tracker(params), progress=not args.quiet, stage=args.stage)
    if not from_env().is_main:
        return 0
    res = out["result"]
    val = (
        f"best val mIoU {res.best_miou:.4f} at epoch {res.best_epoch}"
        if math.isfinite(res.best_miou)
        else "no validation images (best = lowest loss)"
    )
    procs = f" in {from_env().world} processes" if from_env().active else ""
    print(
        f"stage {out['stage']}: {'trained' if res.trained else 'up to date,'} "
        f"{res.steps} steps in {res.train_seconds:.0f}s{procs} "
        f"({'resumed, ' if res.resumed else ''}{res.epochs} epochs); {val}; "
        f"checkpoint {res.best_checkpoint}"
    )
    if out["version"] is not None:
        print(
            f"MLflow run {out['record']['run_id']}; registered "
            f"{out['record']['registered_model']} version {out['version'].version} (challenger)"
        )
    return 0


def cmd_pretrain(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.steps import run_pretrain

    out = run_pretrain(params, _tracker(params), progress=not args.quiet)
    res = out["result"]
    loss = f"final loss {res.history[-1]['loss']:.4f}" if res.history else "no epoch"
    print(
        f"MAE ({res.method}) on {res.images} images: "
        f"{'trained' if res.trained else 'up to date,'} {res.steps} steps in "
        f"{res.seconds:.0f}s, {loss}; encoder {res.encoder_checkpoint}; pictures "
        f"{res.reconstructions}"
    )
    if out["record"] is not None:
        print(f"MLflow run {out['record']['run_id']}")
    return 0


def cmd_stages(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.steps import stage_params

    if args.write_dvc or args.check_dvc:
        from srpu_pipelines.pipeline.dvc_stages import sync_dvc_yaml

        changed = sync_dvc_yaml(params, Path(args.dvc_file), write=args.write_dvc)
        if args.check_dvc and changed:
            raise InputError(
                f"{args.dvc_file}: its training stages differ from the params stages; "
                "run `srpu stages --write-dvc`"
            )
        print(f"{args.dvc_file}: {'updated' if changed and args.write_dvc else 'in step'}")
        return 0
    for i, st in enumerate(params.stages):
        tp = stage_params(params, st.name).train
        budget = f"{tp.total_steps} steps" + (f" or {tp.budget_s:.0f}s" if tp.budget_s else "")
        print(
            f"stages.{i} {st.name}: from {st.init}, encoder {tp.encoder}, lr {tp.lr}, {budget}, "
            f"splits {tp.splits}{', semi-supervised' if tp.semi.enabled else ''} -> {tp.out_dir}"
        )
    return 0


def cmd_plan(params: Params, args: argparse.Namespace) -> int:
    import yaml

    from srpu_pipelines.config import stage_setup
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.training.plan import plan_document

    names = [args.stage] if args.stage else [st.name for st in params.stages]
    setups = {n: stage_setup(params, n) for n in names}
    if args.train_section:
        setups = {"train": stage_setup(params)}
    doc = plan_document(setups, load_index(params.data.index_path))
    if not args.fingerprint:
        doc.pop("fingerprint")
    print(yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True), end="")
    return 0


def cmd_inspect(params: Params | None, args: argparse.Namespace) -> int:
    """One JSON object per file; a file that cannot be read is reported, the rest go on."""
    from srpu_pipelines.data.calibration import inspect_file
    from srpu_pipelines.data.imageio import ImageReadError

    failed = 0
    for f in args.files:
        try:
            print(json.dumps(inspect_file(f), ensure_ascii=False))
        except ImageReadError as e:
            print(json.dumps({"path": f, "error": str(e)}, ensure_ascii=False))
            failed += 1
    return 1 if failed else 0


def cmd_evaluate(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.steps import run_evaluate

    m = run_evaluate(params, _tracker(params), checkpoint=args.checkpoint, progress=not args.quiet)
    print(_table(m, f"split {m['split']} ({m['images']} images), {m['checkpoint']}"))
    for ds, sc in m["per_dataset"].items():
        print(f"  {ds}: mIoU {sc['miou']:.4f}")
    print(f"metrics and overlays in {params.evaluate.out_dir}")
    return 0


def cmd_promote(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.steps import run_promote

    tracker = _tracker(params)
    if tracker is None:
        raise InputError("tracking.enabled is false: there is no registry to promote in")
    name = tracker.registered_model
    if args.version is not None:  # a person rolls the champion back (or forward)
        from srpu_pipelines.pipeline.steps import run_rollback

        e = run_rollback(params, tracker, args.version, args.reason or "")
        print(
            f"{name} version {e['champion_after']} is champion (was {e['champion_before']}); "
            f"recorded as history entry {e['round']}"
        )
        return 0
    g = run_promote(params, tracker)

    def score(v: float | None) -> str:
        return "none" if v is None else f"{v:.4f}"

    if g["passed"]:
        print(
            f"{name} version {g['candidate_version']} is champion (val mIoU "
            f"{score(g['candidate_val_miou'])}; {g['reason'] or 'not below the champion'})"
        )
    else:
        print(
            f"kept champion version {g['champion_version']} (val mIoU "
            f"{score(g['champion_val_miou'])}); candidate {g['candidate_version']} scored "
            f"{score(g['candidate_val_miou'])}" + (f": {g['reason']}" if g["reason"] else "")
        )
    return 0


def cmd_lineage(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.lineage import format_lineage, lineage

    tracker = _tracker(params)
    if tracker is None:
        raise InputError("tracking.enabled is false: there is no registry to trace models in")
    uri = args.model_uri or f"models:/{tracker.registered_model}@champion"
    d = lineage(tracker, uri)
    print(json.dumps(d, indent=2) if args.json else format_lineage(d))
    return 0


def cmd_predict(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.analysis.evaluate import predict_folder
    from srpu_pipelines.pipeline.steps import prediction_checkpoint

    ckpt = (
        Path(args.checkpoint)
        if args.checkpoint
        else prediction_checkpoint(params, _tracker(params))
    )
    res = predict_folder(params, ckpt, progress=not args.quiet)
    print(
        f"{len(res['predicted'])} images segmented into {params.predict.out_dir} "
        f"with {ckpt}, {len(res['skipped'])} skipped"
    )
    for s in res["skipped"]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


def cmd_quantify(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.steps import run_quantify

    doc = run_quantify(params, _tracker(params), progress=not args.quiet)
    for g, s in doc["per_dataset"].items():
        unit = "µm" if s["length_unit"] == "um" else "px"
        fr = ", ".join(
            f"{n} {f['mean']:.3f}" + (f" [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]" if f["ci"] else "")
            for n, f in s["fractions"].items()
        )
        print(f"{g} ({s['images']} images, lengths in {unit}): fractions {fr}")
        for n, p in s["particles"].items():
            d = p[f"eq_diameter_{s['length_unit']}"]
            if d["median"] is not None:
                print(f"  {n}: {p['count']} particles, median diameter {d['median']:g} {unit}")
    print(f"tables and plots in {params.quantify.out_dir}")
    return 0


def cmd_import_masks(params: Params, args: argparse.Namespace) -> int:
    import numpy as np

    from srpu_pipelines.data.annotations import AnnotationError, import_annotation
    from srpu_pipelines.data.masks import MaskCodec

    codec = MaskCodec.from_params(params)
    failed = 0
    for f in args.files:
        try:
            dest, mask = import_annotation(
                f, codec, params.class_names, params.mask.suffix, args.background, args.out
            )
        except AnnotationError as e:
            print(f"srpu: {e}", file=sys.stderr)
            failed += 1
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        shares = ", ".join(
            f"{n} {counts[k] / mask.size:.1%}" for k, n in enumerate(params.class_names)
        )
        print(f"{f} -> {dest} ({shares})")
    return 1 if failed else 0


def cmd_score(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.active import run_score

    res = run_score(params, _tracker(params), progress=not args.quiet)
    print(
        f"pool scored with {res['model_key']}: {res['computed']} images computed, "
        f"{res['kept']} kept (scores still current), {len(res['failed'])} failed"
    )
    for f in res["failed"]:
        print(f"  not scored {f['id']}: {f['reason']}")
    return 0


def cmd_select(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.pipeline.active import run_select

    res = run_select(params, _tracker(params))
    s = res["summary"]
    state = "written" if res["new"] else "unchanged (same model and labels as before)"
    print(f"round {res['round']}: {len(s['selected'])} items in {res['folder']}, {state}")
    for it in s["selected"]:
        print(f"  {it['rank']:>3}. {it['id']}  score {it['combined_score']:.3f}")
    print(s["how_to"])
    return 0


def cmd_labels(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.active_learning.rounds import new_labels
    from srpu_pipelines.data.index import load_index

    new, changed, problems = new_labels(params, load_index(params.data.index_path))
    print(
        f"{len(new)} new and {len(changed)} changed labelled pair(s) not yet indexed, "
        f"{len(problems)} problem(s)"
    )
    for p in new:
        print(f"  new {p.id}: {p.mask}")
    for p in changed:
        print(f"  changed {p.id}: {p.mask}")
    for p in problems:
        print(f"  problem {p}")
    return 1 if problems else 0


def cmd_bench_al_merge(_params: None, args: argparse.Namespace) -> int:
    from srpu_pipelines.bench.al import merge_results, plot_curves
    from srpu_pipelines.io.files import read_json

    res = merge_results([(f, read_json(f)) for f in args.files])
    if args.plot:
        plot_curves(res, Path(args.plot))
        res["plot"] = args.plot
    print(json.dumps(res, indent=2))
    return 0


def cmd_bench(params: Params, args: argparse.Namespace) -> int:
    from srpu_pipelines.bench.ssl import bench_ssl
    from srpu_pipelines.bench.supervised import bench_supervised

    if args.bench == "al":
        from srpu_pipelines.bench.al import bench_al, plot_curves

        res = bench_al(
            params,
            seeds=args.seeds,
            rounds=args.rounds,
            per_round=args.per_round,
            initial=args.initial,
            steps=args.steps,
            budget_s=args.budget_s,
            work_dir=Path(args.work_dir),
            arms=tuple(args.arms),
            max_tiles=args.max_tiles,
            seed_list=args.seed_list,
            progress=not args.quiet,
        )
        if args.plot:
            plot_curves(res, Path(args.plot))
            res["plot"] = args.plot
        print(json.dumps(res, indent=2))
        return 0
    if args.bench == "speed":
        from srpu_pipelines.bench.speed import bench_speed

        res = bench_speed(
            params,
            seeds=args.seeds,
            steps=args.steps,
            budget_s=args.budget_s,
            work_dir=Path(args.work_dir),
            arms=tuple(args.arms),
            peer_script=Path(args.peer),
            progress=not args.quiet,
        )
        print(json.dumps(res, indent=2))
        return 0
    if args.bench == "ssl":
        if args.budget_s is None and args.steps is None:
            raise ParamsError("bench ssl: give --budget-s and/or --steps (per fine-tuning run)")
        res = bench_ssl(
            params,
            ks=args.k,
            seeds=args.seeds,
            budget_s=args.budget_s,
            steps=args.steps,
            mae_budget_s=args.mae_budget_s,
            mae_steps=args.mae_steps,
            work_dir=Path(args.work_dir),
            progress=not args.quiet,
        )
        print(json.dumps(res, indent=2))
        return 0
    if args.budget_s is None and args.steps is None:
        raise ParamsError("bench supervised: give --budget-s and/or --steps")
    files = args.sets or [args.params]
    stems = [Path(f).stem for f in files]
    if len(set(stems)) != len(stems):
        raise ParamsError(f"bench supervised --sets: two files share a name: {files}")
    sets = {Path(f).stem: load_params(f, args.set) for f in files}
    res = bench_supervised(
        sets,
        seeds=args.seeds,
        budget_s=args.budget_s,
        steps=args.steps,
        work_dir=Path(args.work_dir),
        peer_script=Path(args.peer) if args.peer else None,
        progress=not args.quiet,
        keep_weights=args.keep_weights,
    )
    print(json.dumps(res, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="srpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one params key, e.g. --set train.epochs=5 (repeatable)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write the synthetic SEM demo data set (demo.*)")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("index", help="scan data.datasets, validate, split, write the index JSON")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "pretrain", help="MAE-pretrain the encoder on unlabelled images (pretrain.*)"
    )
    p.add_argument("--budget-s", type=float, help="= --set pretrain.budget_s=S")
    p.add_argument("--steps", type=int, help="= --set pretrain.max_steps=K")
    p.set_defaults(func=cmd_pretrain, aliases=pretrain_aliases)

    p = sub.add_parser(
        "train",
        help="train the stages in order, or one (stages, train.*)",
        description="Train the stages of params.yaml in order, or one. A stage's own "
        "`train:` keys win over --set train.KEY=...; to change one stage, --set "
        "stages.N.train.KEY=... (`srpu stages` lists them with their N). The flags below "
        "are such overrides.",
    )
    p.add_argument("--stage", help="train only this stage (default: every stage in order)")
    p.add_argument("--out", help="= --set train.out_dir=DIR (root of the stage folders)")
    p.add_argument("--init", help="= --set stages.N.init=file:PATH (with --stage)")
    p.add_argument("--budget-s", type=float, help="= --set stages.N.train.budget_s=S")
    p.add_argument("--steps", type=int, help="= --set stages.N.train.max_steps=K")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (torchrun; gloo on CPUs, NCCL on "
        "GPUs); train.batch_size is the global batch",
    )
    p.set_defaults(func=cmd_train, aliases=train_aliases)

    for name, helptext, fn in (
        ("evaluate", "per-class IoU/Dice on a split, with overlay pictures", cmd_evaluate),
        ("predict", "segment a folder of images at full size (colour + index masks)", cmd_predict),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--checkpoint",
            help="model .pt (default: evaluate: the final stage folder/"
            "<evaluate.checkpoint>.pt; predict: as predict.source says)",
        )
        p.add_argument("--out", help=f"= --set {name}.out_dir=DIR")
        if name == "evaluate":
            p.add_argument("--split", help="= --set evaluate.split=NAME")
            flags = {"out": "out_dir", "split": "split"}
        else:
            p.add_argument("--input", help="= --set predict.input_dir=DIR")
            flags = {"out": "out_dir", "input": "input_dir"}
        p.set_defaults(func=fn, aliases=section_aliases(name, flags))

    p = sub.add_parser(
        "plan",
        help="the training plan: values for the keys left auto, with the reason for each",
        description="Print, as YAML, the value the plan gives each training key left `auto` "
        "(tile size, batch size, learning rate, warm-up, validation cadence, rare-class crops, "
        "loss and class weights, augmentation) and why, from the fingerprint of the training "
        "images in the index (run `srpu index` first), the budget and the device.",
    )
    p.add_argument("--stage", help="only this stage (default: every stage)")
    p.add_argument(
        "--train-section",
        action="store_true",
        help="plan the top-level train section as it is (what the benchmarks train)",
    )
    p.add_argument("--fingerprint", action="store_true", help="print the fingerprint too")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "inspect",
        help="what image files say about themselves: size, bit depth, pages, compression, "
        "instrument, pixel size and its source (one JSON object per file; no params needed)",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_inspect, needs_params=False)

    p = sub.add_parser("stages", help="list the training stages; keep dvc.yaml in step")
    p.add_argument("--write-dvc", action="store_true", help="rewrite dvc.yaml's stage entries")
    p.add_argument("--check-dvc", action="store_true", help="fail when dvc.yaml is out of step")
    p.add_argument("--dvc-file", default="dvc.yaml")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser(
        "promote",
        help="make the newly trained model champion if its val mIoU is not below the "
        "champion's; --version N: make version N champion (a rollback, recorded in the history)",
    )
    p.add_argument("--version", help="registered version to make champion, without the gate")
    p.add_argument("--reason", help="why (with --version): kept in the history line")
    p.set_defaults(func=cmd_promote)
    p = sub.add_parser(
        "lineage",
        help="where a registered model comes from: version -> data -> rounds -> params -> commit",
    )
    p.add_argument(
        "model_uri", nargs="?", help="default models:/<tracking.registered_model>@champion"
    )
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser(
        "import-masks",
        help="labelme JSON or ImageJ ROI sets (.roi, .zip) -> NAME_mask.png beside each image",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--background",
        metavar="CLASS",
        help="class of pixels no shape covers (default: not labelled, mask.ignore_color)",
    )
    p.add_argument("--out", help="write the masks here instead of beside the images")
    p.set_defaults(func=cmd_import_masks)
    p = sub.add_parser(
        "quantify",
        help="phase fractions, particle sizes, interface density, percolation and tortuosity "
        "of labelled or predicted masks (quantify.*)",
    )
    p.add_argument(
        "--source",
        choices=["labels", "predictions"],
        help="alias of --set quantify.source=...",
    )
    p.add_argument("--out", help="= --set quantify.out_dir=DIR")
    p.set_defaults(
        func=cmd_quantify,
        aliases=section_aliases("quantify", {"source": "source", "out": "out_dir"}),
    )
    p = sub.add_parser(
        "score", help="uncertainty and embeddings of every pool image with the champion (active.*)"
    )
    p.set_defaults(func=cmd_score)
    p = sub.add_parser(
        "select", help="pick the next items to label over the stored scores; write the round folder"
    )
    p.set_defaults(func=cmd_select)
    p = sub.add_parser(
        "labels", help="list new labelled pairs not yet indexed and every problem (exit 1 if any)"
    )
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("bench", help="benchmarks that print JSON (not tests)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bsub.add_parser(
        "supervised",
        help="train from scratch per data set and seed, score the test split; the peer beside",
        description="Per data set (--sets, default --params) and seed: train from scratch "
        "under the budget and score evaluate.split; with --peer, the peer loop on the same "
        "images and budget. Finished runs are kept in WORK/<set>/<loop>/seed<k>.json and "
        "skipped by a rerun (delete them to run again).",
    )
    b.add_argument("--budget-s", type=float, help="training wall-clock seconds per seed")
    b.add_argument("--steps", type=int, help="training steps per seed (with or instead of time)")
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    b.add_argument("--sets", nargs="+", metavar="PARAMS", help="params files, one per data set")
    b.add_argument(
        "--peer",
        nargs="?",
        const="../shared/bench/peer_baseline.py",
        help="also run the peer loop (default script ../shared/bench/peer_baseline.py)",
    )
    b.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep each run's best.pt (~50 MB; by default only the figures stay)",
    )
    b.add_argument("--work-dir", default="outputs/bench/supervised", help="where runs are written")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser(
        "ssl",
        help="k labelled images: scratch vs MAE encoder vs MAE + semi-supervised, test mIoU",
    )
    b.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="labelled images")
    b.add_argument("--budget-s", type=float, help="wall-clock seconds per fine-tuning run")
    b.add_argument("--steps", type=int, help="step cap per fine-tuning run")
    b.add_argument("--mae-budget-s", type=float, default=None, help="MAE pretraining seconds")
    b.add_argument("--mae-steps", type=int, default=None, help="MAE pretraining steps")
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    b.add_argument("--work-dir", default="outputs/bench/ssl", help="where runs are written")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser(
        "speed",
        help="training throughput: model FLOPs/s and %% of the CPU's fp32 peak (or the GPU's "
        "bf16 peak), default and lighter model, beside the peer loop",
    )
    b.add_argument("--steps", type=int, default=120, help="step budget per run (default 120)")
    b.add_argument("--budget-s", type=float, help="also a wall-clock cap per run")
    b.add_argument("--seeds", type=int, default=3, help="runs per arm, interleaved (0..N-1)")
    b.add_argument(
        "--arms",
        nargs="+",
        default=["default", "light", "peer"],
        choices=["default", "light", "peer"],
    )
    b.add_argument("--peer", default="../shared/bench/peer_baseline.py", help="the peer loop")
    b.add_argument("--work-dir", default="outputs/bench/speed", help="where runs are written")
    b.set_defaults(func=cmd_bench)
    from srpu_pipelines.active_learning import AL_ARMS, DEFAULT_AL_ARMS

    b = bsub.add_parser(
        "al",
        help="simulated active learning with an oracle: learning curves per strategy",
    )
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    b.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="seed_list",
        help="run only this seed (repeatable): one command per seed keeps each short",
    )
    b.add_argument("--rounds", type=int, default=10, help="selection rounds after the start")
    b.add_argument("--per-round", type=int, default=2, help="tiles labelled per round")
    b.add_argument(
        "--initial", type=int, default=2, help="tiles each strategy picks from zero labels"
    )
    b.add_argument("--steps", type=int, default=60, help="training steps per round")
    b.add_argument("--budget-s", type=float, help="also a wall-clock cap per round")
    b.add_argument(
        "--max-tiles", type=int, default=256, help="cap on the tile pool (a fixed sample)"
    )
    b.add_argument(
        "--arms",
        nargs="+",
        default=list(DEFAULT_AL_ARMS),
        choices=AL_ARMS,
        help="registered selection strategies to compare",
    )
    b.add_argument("--plot", help="write the learning curves as a PNG here")
    b.add_argument("--work-dir", default="outputs/bench/al", help="where runs are written")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser(
        "al-merge",
        help="one result from per-seed `bench al --seed k` JSON files",
        description="Reads the JSON that separate `srpu bench al --seed k` commands printed "
        "and prints one result over all their seeds (the same summary as one command over "
        "them all). Their settings and arms must agree; no seed may appear twice.",
    )
    b.add_argument("files", nargs="+", help="JSON files printed by `srpu bench al`")
    b.add_argument("--plot", help="write the learning curves as a PNG here")
    b.set_defaults(func=cmd_bench_al_merge, needs_params=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if not args.quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from srpu_pipelines.errors import UserError

    try:
        if not getattr(args, "needs_params", True):
            return args.func(None, args)
        params = load_params(args.params, args.set)
        args.alias_overrides = args.aliases(args, params) if hasattr(args, "aliases") else []
        if args.alias_overrides:  # flags are --set overrides, applied after --set
            params = load_params(args.params, args.set + args.alias_overrides)
        return args.func(params, args)
    except UserError as e:  # a problem the user can fix: one line; anything else is a
        if os.environ.get("SRPU_DEBUG"):  # defect and keeps its traceback
            raise
        print(f"srpu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "srpu: interrupted; `srpu train` resumes from the last finished epoch", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
