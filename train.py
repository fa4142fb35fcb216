"""Shim so that `python train.py model=resnet50 data=hotdog` works from a checkout."""

from finetune.cli.train import main

if __name__ == "__main__":
    main()
