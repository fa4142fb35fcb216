"""How an entry point starts: Hydra composes its config from the shipped configs, found on Hydra's
package search path (not a file path), and a user's mistake ends it in one line.

`conf/` at the top of the checkout is the only copy; `src/finetune/conf` is a symlink to it, so it
is the package `finetune.conf` both in a checkout and inside a built wheel (setuptools copies the
linked files). A path computed from `__file__` (`parents[2] / "conf"`) exists only in a checkout;
`pkg://` works wherever `finetune` is importable. Users add their own config folders next to
ours with Hydra's `--config-dir DIR` (README "Your own configs"); where both hold a file of the
same name, ours is found first, so user files take new names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.runtime import user_errors_as_one_line

CONFIG_PACKAGE = "finetune.conf"
CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"


def entry_point(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """`task` as a Hydra entry point on `conf/<config_name>.yaml`: the `main` of every command.

    Hydra names the job after `task`'s module (kept through `user_errors_as_one_line`'s wraps), so
    each command's job is named as before; its log file is `${task_name}.log` from its config."""
    return hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(
        user_errors_as_one_line(task))
