"""`make demo`'s run: the main job through `dg launch`, told one line per step.

Dagster's own log (every DEBUG event) goes to a file; the screen gets one line per step as
it ends (its time, or the first line of its error), a progress bar while a training stage
trains (from the stage's per-epoch observations: step of total, loss, ETA), and at the
end the report (pipeline/report.py). The run is read from the Dagster instance
($DAGSTER_HOME), the same place the web UI reads it from.

    python -m srpu_pipelines.pipeline.demo_run [--select '*'] [--log FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from srpu_pipelines.errors import MissingError

BIN = Path(sys.executable).parent


def _newest_run(instance: Any, known: set[str]) -> str | None:
    runs = instance.get_runs(limit=5)  # newest first
    return next((r.run_id for r in runs if r.run_id not in known), None)


class StepPrinter:
    """Turns a run's event records into one line per step (and a bar while training)."""

    def __init__(self, out: Any = sys.stdout):
        self.out, self.started, self.bar = out, {}, None
        self.failed: list[str] = []

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def event(self, entry: Any) -> None:
        ev = entry.dagster_event
        if ev is None:
            return
        kind, step = ev.event_type_value, ev.step_key
        if kind == "STEP_START":
            self.started[step] = entry.timestamp
        elif kind == "ASSET_OBSERVATION" and step:
            md = ev.event_specific_data.asset_observation.metadata
            if "total_steps" not in md:
                return
            total, done = int(md["total_steps"].value), int(md["step"].value)
            if self.bar is None:
                tty = getattr(self.out, "isatty", lambda: False)()
                self.bar = tqdm(
                    total=total,
                    desc=f"  {step}",
                    unit="step",
                    file=self.out,
                    leave=False,
                    dynamic_ncols=True,
                    disable=not tty,  # a bar is for a terminal, not for a log
                )
            self.bar.total = total
            self.bar.n = done
            loss = md["loss"].value if "loss" in md else float("nan")
            self.bar.set_postfix_str(f"loss {loss:.3f}, ETA {md['eta_s'].value:.0f} s")
            self.bar.refresh()
        elif kind == "STEP_SUCCESS":
            self._close_bar()
            took = entry.timestamp - self.started.get(step, entry.timestamp)
            print(f"  ok    {step:<40} {took:7.1f} s", file=self.out, flush=True)
        elif kind == "STEP_FAILURE":
            self._close_bar()
            err = ev.event_specific_data.error
            first = (err.message.strip().splitlines() or ["(no message)"])[0] if err else ""
            print(f"  FAIL  {step:<40} {first[:120]}", file=self.out, flush=True)
            self.failed.append(step)

    def close(self) -> None:
        self._close_bar()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--select", default="*", help="asset selection (dg launch --assets)")
    ap.add_argument("--log", default="outputs/demo/dagster.log", help="Dagster's own log")
    args = ap.parse_args(argv)
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        raise MissingError("DAGSTER_HOME is not set (make sets it to .dagster_home)")
    dg_bin = BIN / "dg"
    if not dg_bin.exists():
        raise MissingError(f"{dg_bin} missing: run `make setup`")
    instance = dg.DagsterInstance.get()
    known = {r.run_id for r in instance.get_runs(limit=50)}
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(dg_bin), "launch", "--assets", args.select, "-m", "srpu_pipelines.definitions"]
    print(f"dg launch --assets '{args.select}' (Dagster's own log: {log})", flush=True)
    t0 = time.monotonic()
    printer = StepPrinter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        run_id, cursor = None, None
        while True:
            finished = proc.poll() is not None
            run_id = run_id or _newest_run(instance, known)
            if run_id is not None:
                while True:  # every record so far (one page at a time)
                    conn = instance.get_records_for_run(run_id, cursor=cursor, limit=500)
                    for rec in conn.records:
                        printer.event(rec.event_log_entry)
                    cursor = conn.cursor
                    if not conn.has_more:
                        break
            if finished:
                break
            time.sleep(0.5)
    printer.close()
    took = time.monotonic() - t0
    if proc.returncode != 0:
        print(f"the run failed after {took:.0f} s: see {log} (or make ui)", flush=True)
    else:
        print(f"the run finished in {took:.0f} s", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
