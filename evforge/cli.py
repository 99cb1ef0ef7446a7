"""The ``evforge`` command: parses arguments, then calls library functions usable from Python on their own.

Exit codes: 0 done; 1 done, but some inputs failed (listed: convert's errors.jsonl, simulate's failed sequences,
verify's faults, inspect's unreadable shards); 2 usage or an unusable input (one line naming it); 3 the
environment (disk full, read-only or non-folder output, locked by another run; one line naming the path);
130 interrupted. Finished work is kept in every case: rerun the command to resume.

Messages of the library (its ``logging`` records under ``evforge``) print as they always did: progress lines on
stdout, a failed input's line on stderr (``evforge: failed: ...``); ``--log-level`` chooses how many.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import data, realism, simulate, train
from .commands.common import LOG_LEVELS, cli_logging
from .commands.common import err as _err
from .errors import InputError, OutputError, output_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evforge",
                                     description=__doc__.splitlines()[0].replace("The ``evforge`` command", "evforge"))
    parser.add_argument("--version", action="version", version=f"evforge {__version__}")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="the library's messages shown: info (default: progress lines and failures), "
                             "warning (failures only), error, or debug (more detail)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (train.add_demo, simulate.add_scenes, simulate.add_simulate, data.add_convert, data.add_inspect,
                data.add_verify, data.add_preview, train.add_pretrain, train.add_export, train.add_import,
                train.add_finetune, train.add_eval, realism.add_compare, realism.add_calibrate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    with cli_logging(args.log_level):
        return _run(args)


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        _err(f"error: {e}")
        return 2
    except OutputError as e:
        _err(f"error: {e}")
        return 3
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder, a file where a folder belongs
        env = output_error(e)
        if env is not None:
            _err(f"error: {env}")
            return 3
        if isinstance(e, FileNotFoundError):
            _err(f"error: {' '.join(str(e).split())}")
            return 2
        if isinstance(e, OSError):
            where = f"{e.filename}: " if e.filename else ""
            _err(f"error: {where}{' '.join((e.strerror or str(e)).split())}")
            return 3
        raise
    except ValueError as e:
        _err(f"error: {' '.join(str(e).split())}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted (finished files are kept; rerun to resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
