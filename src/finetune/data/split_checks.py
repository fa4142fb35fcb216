"""Checks on a data module's splits once they are set up, before any training: too many unreadable
files, an empty split, too few evaluation images for the DDP ranks."""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import Dataset

from finetune.data.skipping import SkipReport
from finetune.data.subsets import innermost
from finetune.errors import FinetuneError


def check_readable(datasets: Mapping[str, Dataset], report: SkipReport, max_bad_fraction: float,
                   rank_zero: bool) -> None:
    """Report the files each split left out as unreadable (sources that read files mark them as
    `skipped`, see `finetune.data.skipping`), then refuse a split that lost more than
    `max_bad_fraction` of its files or has nothing left."""
    reported = set()
    for split, dataset in datasets.items():
        source = innermost(dataset)
        skipped, total = getattr(source, "skipped", {}), getattr(source, "total_files", len(source))
        name = getattr(source, "split", split)
        where = str(getattr(source, "root", split))  # val split off train: train's files
        if where not in reported:
            reported.add(where)
            if rank_zero:
                report.add(name, skipped, total)
            if skipped and len(skipped) > max_bad_fraction * total:
                raise FinetuneError(
                    f"{len(skipped)} of {total} files of the {name} split are not readable images, "
                    f"over data.max_bad_fraction={max_bad_fraction}; see {report.path or 'the log'} for which "
                    "and why, then fix or remove them, or raise data.max_bad_fraction (1.0 accepts any number)")
        if len(dataset) == 0:
            raise FinetuneError(
                f"the {split} split has no readable image left ({len(skipped)} of {total} files "
                f"unreadable, see {report.path or 'the log'}); add images to it")


def check_enough_for_each_rank(datasets: Mapping[str, Dataset], world: int) -> None:
    """Under DDP every rank needs an image of each evaluated split: val and test images go to
    exactly one rank each (`finetune.data.loaders.eval_sampler`), and a rank left without a batch
    never joins the gathers of the metrics and the calibration, so the others would wait forever."""
    for split in ("val", "test"):
        dataset = datasets.get(split)
        if world > 1 and dataset is not None and len(dataset) < world:
            raise FinetuneError(
                f"the {split} split has {len(dataset)} image{'s' if len(dataset) != 1 else ''} for {world} "
                f"processes: under DDP each process evaluates its own share and needs at least one; add "
                f"{split} images (data.val_fraction when val is taken off train) or run on fewer devices "
                f"(trainer.devices={max(1, len(dataset))})")
