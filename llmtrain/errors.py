"""User errors: one line on stderr naming the key and the fix, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(Exception):
    """A problem with what the user asked for; `key` names the config key at fault. `quiet`: another rank
    reports the same error (one line per job, not one per process)."""

    def __init__(self, key: str, message: str, quiet: bool = False) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
        self.quiet = quiet

    def __reduce__(self) -> Any:  # travels between ranks (broadcast from rank 0)
        return type(self), (self.key, self.message, self.quiet)


class RunFailed(Exception):
    """The run cannot go on (a full disk, a diverged loss): one line, exit `code`, the last good checkpoint kept."""

    def __init__(self, message: str, code: int = 1, quiet: bool = False) -> None:
        super().__init__(message)
        self.code, self.quiet = code, quiet  # quiet: rank 0 reports it for the whole job

    def __reduce__(self) -> Any:
        return type(self), (str(self), self.code, self.quiet)


class Stopped(Exception):
    """The run stopped before its end on request (a signal); `code` is the process exit code."""

    def __init__(self, message: str, code: int, status: str = "stopped", quiet: bool = False) -> None:
        super().__init__(message)
        self.code, self.status, self.quiet = code, status, quiet  # status: run.json's (stopped | preempted)

    def __reduce__(self) -> Any:
        return type(self), (str(self), self.code, self.status, self.quiet)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless condition holds."""
    if not condition:
        raise ConfigError(key, message)


def unknown_key(path: str, siblings: list[str]) -> ConfigError:
    """The error for a key no schema declares, naming the closest real key."""
    import difflib

    parent, _, key = path.rpartition(".")
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    where = f"in {parent}" if parent else "at the top level"
    return ConfigError(path, f"no such key {where}{hint} (--help lists the config)")


def report_and_exit(err: ConfigError) -> None:
    if not getattr(err, "quiet", False):
        print(f"llmtrain: error: {err}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def user_errors_exit(fn: F) -> F:
    """Decorator: a ConfigError raised by fn becomes one stderr line and exit 2; Stopped its own line and code.

    So does a Hydra / OmegaConf error met while fn reads its config (a `???` left unset, a bad interpolation):
    reported here, inside Hydra's job, it never reaches Hydra's job runner, which would first print
    `Error executing job with overrides: [...]` on a line of its own."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            report_and_exit(err)
        except RunFailed as err:
            if not err.quiet:
                print(f"llmtrain: error: {err}", file=sys.stderr, flush=True)
            sys.exit(err.code)
        except Stopped as stop:
            from llmtrain.interrupt import release_signals

            if not stop.quiet:
                print(f"llmtrain: {stop}", file=sys.stderr, flush=True)
            release_signals()
            sys.exit(stop.code)
        except Exception as ex:
            from llmtrain.cli import hydra_error

            config_err = hydra_error(ex)
            if config_err is None:
                raise
            report_and_exit(config_err)

    return wrapper  # type: ignore[return-value]
