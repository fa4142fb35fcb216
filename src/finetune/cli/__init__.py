"""The entry points: each composes its Hydra config and runs one job (train, evaluate, predict,
export, optimize, prefetch). `python train.py ...` at the repo root and the `finetune-*` console
scripts call their `main`; nothing below `cli/` imports from here."""
