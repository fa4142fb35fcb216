"""Continue a run where it stopped: by run dir, by re-running the same command, after a SLURM requeue,
and job by job in a re-run sweep.

A run dir knows which run it holds from `run.json` (the task overrides it was started with, and
whether it finished), written by the run itself. Hydra's own `.hydra/overrides.yaml` cannot tell:
Hydra rewrites it with the new command's overrides before `main` runs.

- `resume=RUN_DIR`: before Hydra parses the command line, `prepare_argv` replays RUN_DIR's saved
  overrides (the command line's own apply on top) and fixes `hydra.run.dir=RUN_DIR`.
- `resume=auto` (the default): a run dir that holds this same command's unfinished run continues
  from its newest checkpoint; a finished one is not trained again; one that holds another command's
  run is refused (a silent mix of two runs is worse than an error). New timestamped dirs are empty,
  so this only acts for a fixed `hydra.run.dir`, a SLURM job (its run dir is named after the job,
  so a requeued job lands in it again) and the job dirs of a re-run sweep.
- `resume=never`: start afresh, whatever the dir holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.run import run_lock
from finetune.run.distributed import is_global_zero
from finetune.run.safe_checkpoint import LOAD_ERRORS, load_checkpoint

log = logging.getLogger("finetune")

RUN_RECORD = "run.json"
METRICS = "metrics.json"
# Lightning's SLURM requeue saves `hpc_ckpt_<n>.ckpt` in the trainer's default_root_dir (the run dir).
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"
_MULTIRUN_FLAGS = ("-m", "--multirun", "hydra.mode=MULTIRUN")


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`; `model=resnet50` -> `model`: the key an override sets, for merging."""
    return override.split("=", 1)[0].lstrip("+~")


def _value_of(argv: Sequence[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if "=" in a and override_key(a) == key]
    return values[-1] if values else None


def merge_overrides(saved: Sequence[str], given: Sequence[str]) -> list[str]:
    """The saved overrides with the given ones on top: one override per key, the given value wins."""
    given_keys = {override_key(o) for o in given}
    return [o for o in saved if override_key(o) not in given_keys] + list(given)


def run_identity(overrides: Sequence[str]) -> list[str]:
    """The overrides that say which run this is (`resume=` and `ckpt_path=` only say where it
    starts from)."""
    return sorted(o for o in overrides if override_key(o) not in ("resume", "ckpt_path"))


def slurm_job_dir_name(environ: Mapping[str, str]) -> str | None:
    """`<job id>` or `<array job id>_<task id>` for a SLURM batch job (what `scontrol requeue`
    keeps), None outside SLURM and in interactive allocations (job name bash/interactive), where
    Lightning's SLURMEnvironment does not take over either."""
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def task_overrides(args: Sequence[str]) -> list[str]:
    """The command line's overrides of the task's config (what Hydra records as `overrides.task`)."""
    return [a for a in args if "=" in a and not a.startswith("-") and not a.startswith(("hydra.", "hydra/"))]


def saved_overrides(run_dir: Path) -> list[str]:
    """The overrides RUN_DIR's run was started with, from its own record. A dir without one is not
    a run of this project (another tool's Hydra run, a partial copy): refused before anything is
    written there (Hydra would rewrite its `.hydra/` and append to its logs)."""
    if not run_dir.is_dir():
        raise FinetuneError(f"resume={run_dir}: no run there ({run_dir} is not a folder); "
                            f"pass the run dir of a training run, e.g. outputs/<date>/<time>")
    record = read_record(run_dir)
    if record is None:
        raise FinetuneError(f"resume={run_dir}: not a finetune run ({run_dir / RUN_RECORD} is missing: another "
                            "tool's run, or a partial copy); nothing was written there. Pass the run dir of a "
                            "finetune training run, or continue a checkpoint in a new dir with ckpt_path=PATH")
    return list(record["overrides"])


def prepare_argv(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """The command line Hydra should see. `resume=RUN_DIR` becomes RUN_DIR's saved overrides plus
    this command's, in `hydra.run.dir=RUN_DIR`; a SLURM batch job without its own `hydra.run.dir`
    runs in `<paths.log_dir>/slurm/<job id>`, which its requeued self finds again. A fixed run dir
    that holds another command's run is refused here, before Hydra rewrites its `.hydra/`."""
    args = list(argv[1:])
    if any(a in _MULTIRUN_FLAGS for a in args):  # a sweep's jobs resume in their own dirs
        return list(argv)
    resume = _value_of(args, "resume")
    if resume not in (None, "auto", "never", "null", "false"):
        run_dir = Path(resume).expanduser().absolute()
        given = [a for a in task_overrides(args) if override_key(a) != "resume"]
        rest = [a for a in args if a not in given and override_key(a) not in ("resume", "hydra.run.dir")]
        merged = merge_overrides([o for o in saved_overrides(run_dir) if override_key(o) != "resume"], given)
        decide_start(run_dir, merged, str(run_dir), trust=_trusted(args), warn=False)  # before Hydra writes
        _hold(run_dir)
        return [argv[0], *rest, *merged, f"resume={run_dir}", f"hydra.run.dir={run_dir}"]
    run_dir = _value_of(args, "hydra.run.dir")
    if run_dir is not None and "${" not in run_dir:
        decide_start(Path(run_dir), task_overrides(args), resume or "auto", trust=_trusted(args), warn=False)
        _hold(Path(run_dir))
    job = slurm_job_dir_name(environ)
    if job and run_dir is None:
        return [*argv, f"hydra.run.dir=${{paths.log_dir}}/slurm/{job}"]
    return list(argv)


def _trusted(args: Sequence[str]) -> bool:
    return str(_value_of(args, "trust_checkpoint")).lower() in ("true", "1", "yes")


def _hold(run_dir: Path) -> None:
    """Lock a known run dir before Hydra writes into it, for the life of this process (rank zero:
    the other ranks of a DDP run re-run this command line)."""
    if is_global_zero():
        run_lock.hold(run_dir)


@dataclass(frozen=True)
class Start:
    """How this run starts: from `ckpt_path` (None: afresh), or not at all (`finished`)."""

    ckpt_path: Path | None = None
    finished: bool = False


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint written last in the run dir: `checkpoints/*.ckpt` (last.ckpt is rewritten each
    epoch or interval) or Lightning's SLURM `hpc_ckpt_*.ckpt`; on an mtime tie, last.ckpt."""
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob(HPC_CHECKPOINTS)]
    found = [p for p in found if p.is_file()]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))


def resumable_checkpoint(run_dir: Path, trust: bool = False, warn: bool = True) -> Path | None:
    """The newest checkpoint of the run dir that can be resumed from (`newest_checkpoint`'s order).

    A truncated or damaged one (a kill mid-copy, a full disk) is skipped with a warning naming it
    and the one used instead, and is left as it is; none readable is one line. A file that would
    run code is refused (finetune.run.safe_checkpoint), never skipped."""
    found = [p for p in (*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob(HPC_CHECKPOINTS)) if p.is_file()]
    found.sort(key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
    unreadable: list[str] = []
    for path in found:
        why = checkpoint_problem(path, trust)
        if why is None:
            if unreadable and warn:
                log.warning("resume: %s unreadable; resuming from %s, the newest readable checkpoint (the "
                            "unreadable files are left as they are)", "; ".join(unreadable), path)
            return path
        unreadable.append(f"{path} ({why})")
    if unreadable:
        raise FinetuneError(f"{run_dir} has no readable checkpoint ({'; '.join(unreadable)}); nothing was changed: "
                            f"start the run again in another dir, or put a good checkpoint in {run_dir / 'checkpoints'}")
    return None


def checkpoint_problem(path: Path, trust: bool = False) -> str | None:
    """Why `path` cannot be resumed from (truncated, damaged, not a training checkpoint), or None.

    torch.save writes a zip whose directory is at its end, so a truncated file is not a zip; the
    tensors are memory-mapped, not read, so the check costs milliseconds."""
    if not zipfile.is_zipfile(path):
        return "truncated, or not a checkpoint"
    try:
        checkpoint = load_checkpoint(path, trust=trust)
    except LOAD_ERRORS as e:
        return " ".join(str(e).split())[:160] or type(e).__name__
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops"} <= checkpoint.keys():
        return "not a training checkpoint: no state_dict or loops"
    return None


def read_record(run_dir: Path) -> dict | None:
    """The run dir's record (which command it holds, whether it finished); None if it has none; a
    damaged one is one line, never a guess (a guess could continue or skip the wrong run)."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
        valid = (isinstance(record, dict) and isinstance(record.get("finished"), bool)
                 and isinstance(record.get("overrides"), list) and all(isinstance(o, str) for o in record["overrides"]))
        why = None if valid else "not a run record: no overrides list and finished flag"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not JSON: {e}"
    if why:
        newest = newest_checkpoint(run_dir)
        raise FinetuneError(f"{path} is damaged ({why}); it says which command {run_dir} holds: restore it, or "
                            f"continue in a new run dir with ckpt_path={newest or 'PATH.ckpt'} and the run's overrides "
                            f"(.hydra/overrides.yaml); nothing was changed")
    return record


def write_record(run_dir: Path, overrides: Sequence[str], finished: bool) -> None:
    """Say which run the dir holds and whether it finished; written to a temp name and renamed, so
    a kill mid-write leaves the previous record."""
    tmp = run_dir / f".{RUN_RECORD}.{os.getpid()}"
    kept = [o for o in overrides if override_key(o) != "resume"]
    tmp.write_text(json.dumps({"overrides": kept, "finished": finished}, indent=2))
    os.replace(tmp, run_dir / RUN_RECORD)


def decide_start(run_dir: Path, overrides: Sequence[str], resume: str | None, trust: bool = False,
                 warn: bool = True) -> Start:
    """Where this run starts, from what `run_dir` holds and `resume` (auto, never, or a run dir);
    `warn`: log a checkpoint skipped as unreadable (once per run: prepare_argv asks first, silently)."""
    mode = "never" if resume in (None, False, "never", "null", "false") else str(resume)
    if mode == "never":
        return Start()
    explicit = mode != "auto"
    record = read_record(run_dir)
    same = record is not None and run_identity(record["overrides"]) == run_identity(overrides)
    if record is not None and not same and not explicit:
        raise FinetuneError(
            f"{run_dir} holds another run ({_difference(record['overrides'], overrides)}): continue "
            f"it with resume={run_dir} (new overrides apply on top), start afresh there with "
            f"resume=never, or choose another hydra.run.dir")
    if same and record["finished"]:
        return Start(finished=True)
    ckpt = resumable_checkpoint(run_dir, trust, warn) if (same or explicit) else None
    if explicit and ckpt is None:
        raise FinetuneError(f"resume={mode}: {run_dir} has no checkpoint to continue from; "
                            f"start it again without resume=")
    if record is None and not explicit:
        return Start()  # a dir this code did not start: its files are not ours to continue
    return Start(ckpt_path=ckpt)


def _difference(saved: Sequence[str], given: Sequence[str]) -> str:
    """`its overrides: a=1 b=2; this command: a=3`, listing only what differs."""
    old, new = set(run_identity(saved)), set(run_identity(given))
    return (f"its overrides: {' '.join(sorted(old - new)) or 'none'}; "
            f"this command: {' '.join(sorted(new - old)) or 'none'}")


def job_subdir(sweep_dir: str, num: int, overrides: Sequence[str]) -> str:
    """A sweep job's dir name: its number, stable for the same sweep command, so a re-run finds each
    job's dir again. A dir of that number holding a different run (a resumed Optuna study numbers
    its new trials from 0 again; an edited sweep) is left alone: the job goes to `<num>-<hash of its
    overrides>`, which the same job finds again too."""
    name = str(num)
    record = read_record(Path(sweep_dir) / name)
    if record is None or run_identity(record["overrides"]) == run_identity(overrides):
        return name
    digest = hashlib.sha1("\n".join(run_identity(overrides)).encode()).hexdigest()[:8]
    return f"{name}-{digest}"

