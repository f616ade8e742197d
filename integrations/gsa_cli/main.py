"""The ``gsa`` command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gsa_cli.output import error
from gsa_cli.parser import build_parser
from gsa_core.errors import GSAError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GSAError as exc:
        error(str(exc))
        return 2
    except KeyboardInterrupt:
        error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
