"""The data set under a split: a split taken off another (the val split, a resumed run's share) is a
`torch.utils.data.Subset`, and what describes its files (root, transform, skipped files, the
`replace` switch) lives on the data set it was taken from."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset


def innermost(dataset: Dataset) -> Dataset:
    """The data set under every `Subset` layer of `dataset` (`dataset` itself when none)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def drop_late_failures(dataset: Dataset) -> None:
    """A file that fails to decode after the up-front check is dropped from `dataset`'s batches, not
    replaced by a neighbour (`finetune.data.file_checks`): what evaluation, and a conversion that
    must keep every split as it is, need. Data sets that never replace are left as they are."""
    source = innermost(dataset)
    if hasattr(source, "replace"):
        source.replace = False
