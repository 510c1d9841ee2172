"""`llmtrain-dashboard [dir ...]` (`make dashboard`): TensorBoard over every run under runs/ and multirun/.

Serves on localhost and prints the URL; Ctrl-C stops it. Each dir's runs appear under the dir's name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def logdir_spec(dirs: list[Path]) -> str:
    return ",".join(f"{d.name or d.resolve().name}:{d}" for d in dirs)


def main(argv: list[str] | None = None) -> None:
    from llmtrain.cli import report_and_exit
    from llmtrain.errors import ConfigError

    ap = argparse.ArgumentParser(prog="llmtrain-dashboard", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", type=Path, help="dirs holding runs (default: runs and multirun)")
    ap.add_argument("--port", type=int, default=6006, help="0: a free port")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    dirs = args.dirs or [d for d in (Path("runs"), Path("multirun")) if d.is_dir()]
    try:
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing or not dirs:
            raise ConfigError("dirs", f"{', '.join(missing) or 'runs/ and multirun/'} not found; train a run first "
                                      "or name the dirs that hold runs")
    except ConfigError as err:
        report_and_exit(err)
    from tensorboard import program
    from tensorboard.util import tb_logging

    tb_logging.get_logger().setLevel("ERROR")
    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir_spec", logdir_spec(dirs), "--host", args.host, "--port", str(args.port),
                       "--reload_interval", "5"])
    try:
        url = tb.launch()
    except program.TensorBoardServerException as e:  # the port taken, or an address this host lacks
        if isinstance(e, program.TensorBoardPortInUseError):
            report_and_exit(ConfigError("--port", f"port {args.port} on {args.host} is in use (another dashboard?); "
                                                  "choose another with --port N, or --port 0 for a free one"))
        key = "--port" if "superuser" in e.msg else "--host"
        report_and_exit(ConfigError(key, e.msg.removeprefix("TensorBoard ")))
    print(f"llmtrain: dashboard of {', '.join(map(str, dirs))} at {url} (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("llmtrain: dashboard stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
