"""A train loader whose position, shuffle order and worker RNGs travel with the checkpoint.

Lightning saves the `state_dict()` of a train loader that has one (torchdata's
`StatefulDataLoader`) into the checkpoint and loads it back when resuming mid-epoch, so a run
killed mid-epoch continues with the batches it had not seen yet, in the same order. What
torchdata alone does not cover is added here:

- the shuffle: a function of the seed and the epoch (`StatefulDistributedSampler`), so it needs
  no saved generator, also after an end-of-epoch checkpoint, whose loader state Lightning ignores;
- the loader's own generator (the workers' base seed each epoch with non-persistent workers);
- the RNGs inside each worker process (the random crops and flips): `WorkerRngState` reports them
  as the data set's state, which torchdata collects per worker and restores after the worker's
  `worker_init_fn` ran. Only mid-epoch: after an end-of-epoch checkpoint the workers start
  afresh from their seeds, so with workers the augmentations of later epochs differ (within noise).

The main process's RNGs (transforms when there are no workers, dropout) are the
`finetune.callbacks.resume_state.ResumeState` callback's job.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from finetune.run import rng_states

_GENERATOR = "finetune_generator"


class WorkerRngState(Dataset):
    """`dataset` unchanged, plus the RNG states of the process that reads it as its state.

    In a worker process that is the worker's torch, numpy and Python RNGs. The state is only
    restored on the rank that saved it: Lightning keeps rank zero's loader state, and other ranks
    keep the rank-specific worker seeds rather than copy rank zero's augmentations.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def state_dict(self) -> dict[str, Any]:
        # As plain data (numpy's keys as a tensor): checkpoints load weights-only.
        return {"rank": rank_zero_only.rank, "rng": rng_states.collect(include_cuda=False)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rank") == rank_zero_only.rank:
            rng_states.restore(state["rng"])


class ResumableDataLoader(StatefulDataLoader):
    """A `StatefulDataLoader` that also saves and restores its generator's current state (torchdata
    restores the iterator, which redraws the base seed; the generator must not keep that draw)."""

    _pending_generator_state: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.generator is not None:
            state[_GENERATOR] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._pending_generator_state = state.pop(_GENERATOR, None)
        super().load_state_dict(state)

    def _get_iterator(self):
        # The iterator restores the sampler, which rewinds the generator to the epoch's start;
        # only then can the generator take the state it had when the checkpoint was saved.
        iterator = super()._get_iterator()
        if self._pending_generator_state is not None and self.generator is not None:
            self.generator.set_state(self._pending_generator_state)
        self._pending_generator_state = None
        return iterator


def resumable_train_loader(dataset: Dataset, num_workers: int, seed: int | None, num_replicas: int = 1,
                           rank: int = 0, **kwargs: Any) -> ResumableDataLoader:
    """A shuffling train loader whose state resumes exactly (see the module docstring).

    Each epoch's order is a function of `seed` and the epoch (Lightning calls `set_epoch`), as with
    Lightning's DistributedSampler, and the sampler counts what it yielded: a checkpoint saved at
    an epoch's end (whose loader state Lightning does not load back) and one saved mid-epoch both
    continue with the order the run left alone would have had. Under DDP each rank takes its share.
    The loader's generator (workers' base seeds) is seeded from the global torch RNG, so creating
    an epoch's iterator draws nothing from the global RNG, which the checkpoint restores at a
    different point than where the original run created it.
    """
    if seed is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
    sampler = StatefulDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                         seed=seed)
    generator_seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return ResumableDataLoader(
        WorkerRngState(dataset) if num_workers > 0 else dataset,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(generator_seed),
        **kwargs,
    )
