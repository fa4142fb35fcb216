"""finetune: transfer learning for image classification with Lightning and Hydra."""

from finetune.errors import FinetuneError
from finetune.run import run_dir  # noqa: F401  registers ${finetune_pid:} (run dir names) before Hydra resolves them

__all__ = ["FinetuneError"]
__version__ = "0.1.0"
