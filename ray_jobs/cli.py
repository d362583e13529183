"""What every job's ``main`` shares: logging set-up and turning project errors into exit 2."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from medbalance.errors import MedbalanceError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a job's ``main``; a :class:`MedbalanceError` prints its message and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except MedbalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
