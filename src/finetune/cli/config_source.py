"""Where the entry points find the shipped configs: Hydra's package search path, not a file path.

`conf/` at the top of the checkout is the only copy; `src/finetune/conf` is a symlink to it, so it
is the package `finetune.conf` both in a checkout and inside a built wheel (setuptools copies the
linked files). A path computed from `__file__` (`parents[2] / "conf"`) exists only in a checkout;
`pkg://` works wherever `finetune` is importable. Users add their own config folders next to
ours with Hydra's `--config-dir DIR` (README "Your own configs"); where both hold a file of the
same name, ours is found first, so user files take new names.
"""

from __future__ import annotations

CONFIG_PACKAGE = "finetune.conf"
CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"
