"""The ``gsa`` command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gsa_cli.failures import add_debug_flag, report, split_debug, tolerant_streams
from gsa_cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``gsa`` command. Every failure ends as one line and an exit status: 2 for bad input and the
    environment, 130 for Ctrl+C, 1 for a bug; ``--debug`` or ``GSA_DEBUG=1`` adds the traceback
    (``gsa_cli.failures``, docs/safety.md). Usage errors exit through argparse (status 2)."""
    args_list, debug = split_debug(sys.argv[1:] if argv is None else argv)
    tolerant_streams()
    try:
        parser = build_parser()
        add_debug_flag(parser)
        args = parser.parse_args(args_list)
        return int(args.handler(args) or 0)
    except SystemExit:  # argparse's usage errors and --help
        raise
    except BaseException as exc:
        return report(exc, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
