"""The errors a command ends with in one line, no traceback: a user's mistake (ConfigError, naming the key and
the fix), a run that cannot go on (RunFailed), a stop on request (Stopped). `llmtrain.cli` reports them."""

from __future__ import annotations

from typing import Any

EXIT_USAGE = 2  # a user's mistake (ConfigError)
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


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
