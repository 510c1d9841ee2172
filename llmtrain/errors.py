"""User errors: one line on stderr naming the key and the fix, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(Exception):
    """A problem with what the user asked for; `key` names the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless condition holds."""
    if not condition:
        raise ConfigError(key, message)


def report_and_exit(err: ConfigError) -> None:
    print(f"llmtrain: error: {err}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def user_errors_exit(fn: F) -> F:
    """Decorator: a ConfigError raised by fn becomes one stderr line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            report_and_exit(err)

    return wrapper  # type: ignore[return-value]
