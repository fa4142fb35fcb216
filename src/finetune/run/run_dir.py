"""`${finetune_pid:}` for run and sweep dir names (conf/hydra/default.yaml).

Two runs started at the same moment must never share a dir: the time to the microsecond (Hydra's
`now`) plus the launching process's id makes each name unique on a machine, and across the
machines of a cluster short of two clocks agreeing to the microsecond on top of equal pids.

Cached like `now`: Hydra copies the launching process's resolver cache into every job's config,
and pickled configs carry it, so jobs run by other processes (joblib, SLURM) see the same sweep
dir. Registered when `finetune` is imported, i.e. before Hydra resolves any dir.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("finetune_pid", lambda: str(os.getpid()), use_cache=True, replace=True)
