"""What every llmtrain command shares: its errors (llmtrain.errors, Hydra's own) as one line on stderr and an
exit code (2 for a user's mistake), Ctrl-C without a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from llmtrain.errors import EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, RunFailed, Stopped, unknown_key

F = TypeVar("F", bound=Callable[..., Any])


def report_and_exit(err: ConfigError) -> None:
    """`llmtrain: error: <key>: <message>` on stderr (unless another rank reports it), exit 2."""
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
            config_err = hydra_error(ex)
            if config_err is None:
                raise
            report_and_exit(config_err)

    return wrapper  # type: ignore[return-value]


def hydra_error(ex: BaseException) -> ConfigError | None:
    """A Hydra / OmegaConf composition error (typo, wrong type, unknown option) as a one-line ConfigError.

    None when `ex` is not one (a bug keeps its traceback)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
    )

    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            typ = getattr(cause, "object_type", None)
            fields = getattr(typ, "__dataclass_fields__", None)
            return unknown_key(key, sorted(fields) if fields else [])
        if isinstance(cause, MissingMandatoryValue):
            return ConfigError(key, f"is required; give {key}=... (--help lists the config)")
        return ConfigError(key, _first_line(getattr(cause, "msg", None) or str(cause)))
    if isinstance(ex, MissingConfigException):
        missing = (ex.missing_cfg_file or "").strip("/")
        group, _, name = missing.rpartition("/")
        if group and ex.options is not None:
            return ConfigError(group, f"no option {name!r}; choose one of {', '.join(sorted(ex.options))}")
        return ConfigError("config", _first_line(str(ex)))
    if isinstance(ex, OverrideParseException):
        return ConfigError("overrides", f"cannot parse {getattr(ex, 'override', None)!r}: {_first_line(str(ex))} "
                                        "(use key=value or group=option)")
    if isinstance(ex, (HydraException, OmegaConfBaseException)):
        return ConfigError("config", _first_line(str(ex)))
    return None


def hydra_quote(value: str) -> str:
    """`value` as one Hydra string literal: parentheses, commas, quotes, `${` and all. In Hydra's quoted
    strings a backslash is literal except before a quote (or the closing quote), where it is doubled."""
    import re

    body = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'").replace("${", "\\${")
    return f"'{body}'"


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), text).rstrip(".")


# Libraries that log each HTTP request (or retry) at INFO: under the root logger's INFO level of Hydra's
# job_logging they would print `HTTP Request: GET https://huggingface.co/...` lines between ours.
CHATTY_LOGGERS = ("httpx", "httpcore", "huggingface_hub", "urllib3")


def quiet_chatty_loggers() -> None:
    """Those libraries log at WARNING and above only. Set on their own loggers, before Hydra configures
    logging: its job_logging sets the root's level and leaves the levels of loggers it does not name."""
    import logging

    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # NOTSET (0) included: it would follow the root's INFO
            logger.setLevel(logging.WARNING)


def run_app(app: Callable[[], Any]) -> Any:
    """Run a `@hydra.main` app: its composition errors and Ctrl-C end in one line, not a traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # exceptions reach us instead of Hydra's multi-line report
    quiet_chatty_loggers()
    try:
        return app()
    except KeyboardInterrupt:
        print("llmtrain: interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as ex:
        code, line = path_error(ex) if isinstance(ex, OSError) else (0, None)
        if line is not None:
            print(f"llmtrain: error: {line}", file=sys.stderr, flush=True)
            sys.exit(code)
        err = ex if isinstance(ex, ConfigError) else hydra_error(ex)  # also from outside a run (a launcher)
        if err is None:
            raise
        print(f"llmtrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def path_error(ex: OSError) -> tuple[int, str | None]:
    """(exit code, one line) for an OSError on a path the user chose (a run dir Hydra cannot create: a name too
    long for the file system, a file in the way; a read-only or full disk); (0, None) for any other OSError,
    which keeps its traceback."""
    import errno

    if ex.filename is None:
        return 0, None
    where = f"{ex.filename}: {ex.strerror or type(ex).__name__}"
    if ex.errno == errno.ENAMETOOLONG:
        return EXIT_USAGE, (f"path: {where} (a file name holds at most 255 bytes); shorten name=... or "
                            "hydra.run.dir=...")
    if ex.errno in (errno.EEXIST, errno.ENOTDIR):
        return EXIT_USAGE, f"path: {where} (a file stands where a dir is needed); give hydra.run.dir=<a dir>"
    if ex.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR):
        return EXIT_USAGE, f"path: {where}"
    if ex.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return 1, f"path: {where}"
    return 0, None
