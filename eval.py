"""Shim so that `python eval.py ckpt_path=PATH [data=...]` works from a checkout."""

from finetune.cli.evaluate import main

if __name__ == "__main__":
    main()
