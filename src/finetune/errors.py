"""The one exception type for mistakes a user can fix.

Entry points print its message as a single line, without a traceback; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A user-facing error: the message names the bad thing and the fix."""


def find_user_error(exc: BaseException) -> FinetuneError | None:
    """Return the FinetuneError behind `exc`, if any.

    Hydra's `instantiate` wraps whatever a constructor raises, so the user's error may sit a few
    links down the exception chain.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, FinetuneError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
