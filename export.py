"""Shim so that `python export.py ckpt_path=PATH format=onnx|torchscript` works from a checkout."""

from finetune.cli.export import main

if __name__ == "__main__":
    main()
