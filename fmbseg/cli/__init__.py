"""The ``fmbseg`` command: one module per subcommand, registered on import (see core).

The import order is the order ``fmbseg --help`` lists the commands in.
"""

# isort: off
from fmbseg.cli import index, annotate, train, segment, evaluate, run, retrain, models, status  # noqa: F401

# isort: on
from fmbseg.cli.core import Common, UsageError, main, parse_storage_options

__all__ = ["Common", "UsageError", "main", "parse_storage_options"]
