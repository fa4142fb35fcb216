"""How the processes of one DDP run share one Hydra run: one run dir, one log, rank zero writes.

Lightning starts ranks 1..N-1 of a single-node DDP run by re-running the command line with
`hydra.run.dir=<HydraConfig run.dir>` appended. In a sweep that command line is the whole sweep
(`-m model=a,b`): every child would start the sweep again, in a sweep dir of its own clock, and
run its jobs out of step with rank zero's. `one_run_for_all_ranks` makes the command line this
one job, in run mode, in this job's output dir, for as long as the job runs. When the job ends it
also undoes what the DDP launch left in this process (the process group, MASTER_PORT, LOCAL_RANK,
...), or the sweep's next job would reuse a dead group and take itself for a child.

Every rank also composes the config and has Hydra configure logging into the same `train.log`;
other ranks keep only warnings, on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf, read_write

# Hydra's flags that choose the config; each takes a value.
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Hydra overrides that only concern the sweep; a child runs one job.
_SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra/sweeper", "hydra.sweeper",
               "hydra/launcher", "hydra.launcher", "hydra.job.num", "hydra.job.id")
# What Lightning's DDP launch sets in the launching process's environment.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_global_zero() -> bool:
    """Rank zero of the whole run, known from the environment before any Trainer exists."""
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


def one_job_argv(argv: Sequence[str], task: Sequence[str], hydra: Sequence[str]) -> list[str]:
    """The command line that runs only the job with these overrides (`hydra.overrides.*`)."""
    flags: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg in _CONFIG_FLAGS:
            flags += [arg, next(args, "")]
        elif arg.split("=", 1)[0] in _CONFIG_FLAGS:
            flags.append(arg)
    kept = [o for o in hydra if not o.lstrip("+~").startswith(_SWEEP_ONLY)]
    return [argv[0], *flags, *task, *kept, "hydra.mode=RUN"]


def quiet_other_ranks() -> None:
    """On ranks other than zero: no writes to the run's log file, and only warnings on the console."""
    if is_global_zero():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


@contextlib.contextmanager
def one_run_for_all_ranks() -> Iterator[None]:
    """While the job runs, DDP children started by Lightning re-run this job, in this job's dir;
    afterwards this process is as ready for the next job of a sweep as it was for this one."""
    quiet_other_ranks()
    saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    saved_argv = list(sys.argv)
    saved_dir = OmegaConf.to_container(hc.run)["dir"] if hc else None
    if hc is not None:
        with read_write(hc.run):
            hc.run.dir = hc.runtime.output_dir
        if hc.mode == RunMode.MULTIRUN:
            sys.argv = one_job_argv(sys.argv, hc.overrides.task, hc.overrides.hydra)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = saved_argv
        if hc is not None:
            with read_write(hc.run):
                hc.run.dir = saved_dir
