"""`python -m finetune.cli.prefetch model=resnet50 data=hotdog`: fill the caches an offline run reads.

Run it where there is internet (a login node) with the overrides of the training run; the compute
node then finds the weights in torch.hub's cache (timm's in Hugging Face's) and the data set under
`data.root`, and needs no network. What could not be fetched is listed with its URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune.cli.config_source import entry_point
from finetune.errors import FinetuneError
from finetune.models import weights as weights_lib
from finetune.models.backbones import build_network


@dataclass
class Fetched:
    what: str
    where: str | None = None  # set when it is on this machine now
    url: str | None = None  # where it comes from, when that is a network address
    error: str | None = None

    def line(self) -> str:
        if self.where is not None:
            return f"{self.what}: {self.where}"
        return f"{self.what}: could not reach {self.url or '?'} ({self.error})"


def fetch_weights(name: str, weights: str | None) -> Fetched:
    spec = weights_lib.resolve(name, weights)
    fetched = Fetched(f"weights {name} {weights}", url=spec.url())
    try:
        spec.load(build_network(spec))
        fetched.where = spec.location()
    except FinetuneError as e:
        fetched.error = str(e)
    return fetched


def fetch_data(data_cfg: DictConfig) -> Fetched:
    datamodule = hydra.utils.instantiate(data_cfg)
    kind = data_cfg._target_.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    fetched = Fetched(f"data {kind}", url=getattr(datamodule, "url", None))
    try:
        datamodule.prepare_data()
        root = getattr(datamodule, "root", None)
        fetched.where = str(Path(root).resolve()) if root is not None else "generated, nothing to fetch"
    except FinetuneError as e:
        fetched.error = str(e)
    return fetched


def prefetch(cfg: DictConfig) -> list[Fetched]:
    """Fetch the weights and data set `cfg` names; print where each went, or the URL that failed."""
    results = [fetch_weights(cfg.model.name, cfg.model.weights), fetch_data(cfg.data)]
    for result in results:
        print(result.line(), flush=True)
    return results


def prefetch_all(cfg: DictConfig) -> None:
    """`prefetch`, failing in one line that names every URL it could not reach."""
    failed = [r for r in prefetch(cfg) if r.where is None]
    if failed:
        urls = ", ".join(r.url or r.what for r in failed)
        raise FinetuneError(
            f"could not reach {urls}; run prefetch where there is internet, or put the files "
            "where the lines above say"
        )


main = entry_point("prefetch", prefetch_all)

if __name__ == "__main__":
    main()
