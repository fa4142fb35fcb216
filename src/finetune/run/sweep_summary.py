"""One table for a whole multirun: which overrides gave which validation and test result, where
the run dir is, and which jobs failed. Written as `summary.csv` and `summary.md` in the sweep dir.

Each job records itself (`sweep_job.json` in its run dir) when it ends, from whatever process ran
it (this one, a joblib worker, a SLURM node), and the summary is rebuilt from those records; so a
failed job is a row like the others and stops nothing. Hydra skips `on_multirun_end` when a job
failed, so the table is then printed when the process exits.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from finetune.run.distributed import is_global_zero
from finetune.run.resume import job_subdir

RECORD = "sweep_job.json"
METRICS = "metrics.json"

# hydra.sweep.subdir (conf/hydra/default.yaml) names each job's dir with this. Hydra builds its
# callbacks, this module's SweepSummary among them, before any job, in every process that runs
# jobs (joblib and SLURM workers unpickle them), so registering here reaches all of them.
OmegaConf.register_new_resolver(
    "finetune_job_subdir", lambda sweep_dir, num, overrides: job_subdir(sweep_dir, int(num), list(overrides)),
    replace=True)


def job_record(job_return: JobReturn, output_dir: Path, job_num: int) -> dict[str, Any]:
    """What the summary needs to know about one finished job."""
    completed = job_return.status == JobStatus.COMPLETED
    metrics_file = output_dir / METRICS
    metrics = json.loads(metrics_file.read_text()) if completed and metrics_file.is_file() else {}
    error = None if completed else job_return._return_value  # `return_value` would re-raise it
    return {
        "job": job_num,
        "status": "completed" if completed else "failed",
        "overrides": list(job_return.overrides or []),
        "metrics": metrics,
        "run_dir": str(output_dir),
        "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}" if error else "",
    }


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sweep_dir.rglob(RECORD)]
    return sorted(records, key=lambda r: r["job"])


def summary_rows(records: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, str]]:
    """One row per job; overrides shared by every job are left out, so the row shows what varied."""
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    rows = []
    for r in records:
        row = {"job": str(r["job"]), "status": r["status"],
               "overrides": " ".join(o for o in r["overrides"] if o not in shared)}
        for name in metrics:
            value = r["metrics"].get(name)
            row[name] = "" if value is None else repr(float(value))
        row.update(run_dir=r["run_dir"], error=r["error"])
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, metrics: list[str]) -> list[dict[str, str]]:
    """Rewrite summary.csv and summary.md from the job records in `sweep_dir`; returns the rows."""
    rows = summary_rows(read_records(sweep_dir), metrics)
    if not rows:
        return rows
    columns = list(rows[0])
    tmp = sweep_dir / f".summary.csv.{os.getpid()}"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, sweep_dir / "summary.csv")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_shown(row, c).replace("|", "\\|") or " " for c in columns) + " |"
              for row in rows]
    tmp = sweep_dir / f".summary.md.{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, sweep_dir / "summary.md")
    return rows


def _shown(row: dict[str, str], column: str) -> str:
    """Metrics to 4 decimals for reading; the CSV keeps them whole."""
    return f"{float(row[column]):.4f}" if "/" in column and row[column] else row[column]


def print_summary(sweep_dir: Path, rows: list[dict[str, str]]) -> None:
    """The table on the console, run dirs relative to the sweep dir named in the title."""
    table = Table(title=f"sweep summary: {sweep_dir}/summary.csv, summary.md")
    columns = [c for c in (rows[0] if rows else []) if c != "error"]
    for column in columns:
        table.add_column(column, justify="right" if "/" in column else "left")
    for row in rows:
        run_dir = Path(row["run_dir"])
        row = {**row, "run_dir": str(run_dir.relative_to(sweep_dir)) if run_dir.is_relative_to(sweep_dir) else str(run_dir)}
        table.add_row(*(_shown(row, c) for c in columns), style="red" if row["status"] == "failed" else None)
    Console().print(table)
    for row in rows:
        if row["error"]:
            Console(stderr=True).print(f"job {row['job']} failed: {row['error']}", markup=False)


class SweepSummary(Callback):
    """A Hydra callback (`hydra.callbacks`) that keeps the multirun's summary up to date."""

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = list(metrics or ["val/acc_best", "test/acc"])
        self._printed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.register(self._finish, Path(config.hydra.sweep.dir).absolute())

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not is_global_zero():
            return
        output_dir = Path(config.hydra.runtime.output_dir)
        record = job_record(job_return, output_dir, int(config.hydra.job.num))
        (output_dir / RECORD).write_text(json.dumps(record, indent=2))
        write_summary(Path(config.hydra.sweep.dir).absolute(), self.metrics)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(Path(config.hydra.sweep.dir).absolute())

    def _finish(self, sweep_dir: Path) -> None:
        if self._printed or not sweep_dir.is_dir():
            return
        self._printed = True
        rows = write_summary(sweep_dir, self.metrics)
        if rows:
            print_summary(sweep_dir, rows)
