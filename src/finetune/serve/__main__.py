"""`python -m finetune.serve ckpt_path=PATH`."""

from finetune.serve.app import main

if __name__ == "__main__":
    main()
