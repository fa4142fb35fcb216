"""The life of a run around the training itself: its dir and lock, resuming and requeueing,
checkpoints written whole and read safely, DDP ranks sharing one run, caches shared by concurrent
jobs, and the sweep's summary table."""
