"""Shim so that `python predict.py ckpt_path=PATH input=FILE_OR_DIR` works from a checkout."""

from finetune.cli.predict import main

if __name__ == "__main__":
    main()
