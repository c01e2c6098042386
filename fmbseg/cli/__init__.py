"""The ``fmbseg`` command: one module per subcommand, registered on import (see core)."""

from fmbseg.cli import (
    annotate,  # noqa: F401
    evaluate,  # noqa: F401
    index,  # noqa: F401  (registers the subcommand)
    retrain,  # noqa: F401
    run,  # noqa: F401
    segment,  # noqa: F401
    train,  # noqa: F401
)
from fmbseg.cli.core import Common, UsageError, main, parse_storage_options

__all__ = ["Common", "UsageError", "main", "parse_storage_options"]
