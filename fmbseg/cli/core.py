"""The ``fmbseg`` command.

Every subcommand is one function registered with :func:`command`; it receives the parsed
arguments and the validated :class:`Common` settings (the options every subcommand shares),
runs a Prefect flow and prints where the outputs are. Errors in the user's input (config,
store, source) print ``fmbseg: error: <message>`` in one line and exit with status 2, Ctrl-C
exits with 130; the store is checked (:func:`~fmbseg.storage.preflight.check_store`) before
any command runs.

Each subcommand lives in its own module of this package and registers itself::

    @command("train", "train the alignment module", Arg("--labels", required=True))
    def cmd_train(args: argparse.Namespace, common: Common) -> int:
        ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml

from fmbseg import __version__
from fmbseg.config import Config, load_config, replace
from fmbseg.storage.preflight import check_store
from fmbseg.storage.store import ArtifactStore

DEFAULT_STORE = "./fmbseg-store"


class UsageError(ValueError):
    """A command-line value is malformed."""


@contextmanager
def usage_errors(prefix: str, *errors: type[Exception]) -> Iterator[None]:
    """Raise the ``errors`` the block raises as a :class:`UsageError`: ``prefix`` + message."""
    try:
        yield
    except errors as exc:
        raise UsageError(f"{prefix}{exc}") from None


@dataclass(frozen=True)
class Common:
    """The options every subcommand shares, parsed and validated."""

    store: str
    config: str
    overrides: tuple[str, ...]
    ray_address: str | None
    storage_options: dict[str, Any]
    cfg: Config  # the loaded config, overrides and ray address applied

    def open_store(self) -> ArtifactStore:
        return ArtifactStore(self.store, self.storage_options)

    def flow_args(self) -> dict[str, Any]:
        """The parameters every flow takes: store, config, overrides, Ray, storage options."""
        return {
            "store": self.store,
            "config": self.config,
            "overrides": list(self.overrides),
            "ray_address": self.ray_address,
            "storage_options": self.storage_options or None,
        }


class Arg:
    """One ``add_argument`` call, declared with the command."""

    def __init__(self, *flags: str, **kwargs: Any) -> None:
        self.flags, self.kwargs = flags, kwargs


IMAGES = Arg(
    "--images",
    required=True,
    help="folder, fsspec URI prefix (s3://bucket/photos/), .txt list of URIs or COCO .json",
)
IMAGE_ROOT = Arg(
    "--image-root",
    default=None,
    help="for a COCO JSON or .txt list: the folder its relative entries are under (default: "
    "the list's folder); they may not climb out of it",
)
DRY_RUN = Arg(
    "--dry-run",
    action="store_true",
    help="print each stage it would run, its fingerprint, whether it is committed and how "
    "many shards remain; runs nothing, loads no model, writes nothing",
)
TEACHER = Arg(
    "--teacher",
    default=None,
    choices=["clip_sam", "sam3"],
    help="stage 1's labeller (models.teacher): clip_sam = CLIP's presence vote + SAM masks "
    "(the paper, default); sam3 = SAM 3's text-prompted concept masks (the sam3 extra)",
)

Handler = Callable[[argparse.Namespace, Common], int]


@dataclass(frozen=True)
class _Command:
    help: str
    args: tuple[Arg, ...]
    handler: Handler
    config: str  # --config's default
    writes_store: bool


_COMMANDS: dict[str, _Command] = {}


def command(
    name: str,
    help: str,
    *args: Arg,
    config: str = "default",
    writes_store: bool = True,
) -> Callable[[Handler], Handler]:
    """Register ``fn(args, common) -> exit status`` as subcommand ``name``.

    ``config``: the command's default ``--config``. ``writes_store``: the store must be
    writable (checked before the command runs); False for commands that only read it.
    """

    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = _Command(help, args, fn, config, writes_store)
        return fn

    return register


# ---- parsing ----------------------------------------------------------------------------------


def positive_int(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` for ``flag``: a whole number >= 1, else a message naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a whole number, got {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``["key=abc", "client_kwargs.endpoint_url=http://h:9000"]`` -> nested dict.

    Values are parsed as YAML scalars (``anon=true`` gives a bool).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--storage-option {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"--storage-option {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--storage-option {item!r}: {part!r} is already a value")
        node[parts[-1]] = value
    return out


def _common(args: argparse.Namespace) -> Common:
    if getattr(args, "teacher", None):  # a named shortcut for --set models.teacher=...
        args.set = [*args.set, f"models.teacher={args.teacher}"]
    cfg = load_config(args.config, list(args.set))
    if args.ray_address:
        cfg = replace(cfg, runtime={"ray_address": args.ray_address})
    if cfg.runtime.executor == "ray":  # seconds, not Ray's minutes of retries
        from fmbseg.engine.ray_cluster import check_ray_address

        check_ray_address(cfg.runtime.ray_address)
    return Common(
        store=args.store,
        config=args.config,
        overrides=tuple(args.set),
        ray_address=args.ray_address,
        storage_options=parse_storage_options(args.storage_option),
        cfg=cfg,
    )


def _add_common_options(parser: argparse.ArgumentParser, config: str) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help="artifact store: a folder or fsspec URI (default %(default)s)",
    )
    group.add_argument(
        "--config",
        default=config,
        help="built-in config name (default, quickstart, tiny) or a YAML file "
        "(default %(default)s)",
    )
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. runtime.shard_size=64",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to use: 'auto', 'HOST:6379' (its GCS) or 'ray://HOST:10001', "
        "checked within seconds (default: a local Ray, none for a one-shard stage)",
    )
    group.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for remote URIs (repeatable; dots nest: "
        "client_kwargs.endpoint_url=http://host:9000)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="show Prefect/Ray logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmbseg",
        description="Annotation-free semantic segmentation: pseudo-labels from CLIP + SAM, "
        "and an open-vocabulary segmenter trained on them (FMbSeg).",
    )
    parser.add_argument("--version", action="version", version=f"fmbseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in _COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        _add_common_options(p, cmd.config)
        for a in cmd.args:
            p.add_argument(*a.flags, **a.kwargs)
    return parser


# ---- running flows ----------------------------------------------------------------------------


def _not_a_user_error(record: logging.LogRecord) -> bool:
    """Drop Prefect's failure logs for input errors; the CLI prints those in one line."""
    from fmbseg.flows.common import USER_ERRORS, is_user_error

    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and is_user_error(exc):
        return False
    if record.levelno < logging.ERROR:
        return True
    # "Finished in state Failed('... encountered an exception SourceError: ...')"
    message = record.getMessage()
    return not any(f"{cls.__name__}: " in message for cls in USER_ERRORS)


@contextmanager
def _quiet_user_errors() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in loggers:
        lg.addFilter(_not_a_user_error)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(_not_a_user_error)


@contextmanager
def progress_bars() -> Iterator[None]:
    """tqdm bars (on stderr), one per stage, fed by the flows' progress reports (shards;
    training's, epochs); each stage's report (cached / resumed / done, with its counts and
    fingerprint) on stdout."""
    from tqdm import tqdm

    from fmbseg.flows.common import observe_progress

    bars: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            unit = "epoch" if stage == "train" else "shard"
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def on_report(message: str) -> None:  # what a stage reused, resumed or committed
        tqdm.write(message, file=sys.stdout)

    from fmbseg.engine.runner import add_reporter

    remove = add_reporter(on_report)
    with observe_progress(on_progress):
        try:
            yield
        finally:
            remove()
            for bar in bars.values():
                bar.close()


def _quiet_environment(verbose: bool) -> None:
    # Before prefect is imported; the library itself never reads the environment.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        # ray.init's notices (token authentication, a dashboard URL that ends with the run)
        os.environ.setdefault("RAY_LOGGER_LEVEL", "error")


# ---- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_environment(args.verbose)
    from fmbseg.flows.common import is_user_error

    try:
        common = _common(args)
        cmd = _COMMANDS[args.command]
        check_store(common.store, common.storage_options, write=cmd.writes_store)
        with _quiet_user_errors():
            return cmd.handler(args, common)
    except KeyboardInterrupt:
        print("fmbseg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # input errors, also when a worker raised one (StageError)
        if not isinstance(exc, UsageError) and not is_user_error(exc):
            raise
        print(f"fmbseg: error: {exc}", file=sys.stderr)
        return 2
