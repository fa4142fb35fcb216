"""finetune: transfer learning for image classification with Lightning and Hydra."""

from finetune.errors import FinetuneError

__all__ = ["FinetuneError"]
__version__ = "0.1.0"
