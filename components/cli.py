"""`python -m components <step> [--params FILE] [--set section.key=value ...]`.

The one entry point of every step: DVC stages, Airflow tasks, KFP components and
containers all run this. It parses params once, hands the step its section, prints the
step's summary, and turns known failures into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from components.config import (
    REFRESH,
    SECTIONS,
    ConfigError,
    Params,
    StepPaths,
    describe_section,
    describe_top_level,
    load_params,
)
from components.contract import SHARDED_STEPS, STEPS
from components.errors import StepFailed
from components.io.workdir_lock import holding

DEFAULT_PARAMS = "params.yaml"
log = logging.getLogger("components")


# Operator commands on the production store (storage.uri) and the MLflow registry.
COMMANDS = {
    "create-store": "create an empty production store at storage.uri (once, before promoting)",
    "versions": "list the versions in the production store, their metrics, the current one",
    "rollback": "point CURRENT back (default: the version before it) and move the alias",
    "remove": "take listings out of search now (tombstones: every release leaves them out "
    "until the catalog drops them or they are restored)",
    "restore": "undo a removal: the listings leave the tombstones, the next release holds them",
    "serve": "serve the store's CURRENT release: search API and page (params: serve)",
    "refresh": "embed new and changed listings with the current model, update its index, "
    "evaluate, promote (never trains)",
}
TOMBSTONE_COMMANDS = ("remove", "restore")  # take listing ids (and --from, --reason)
STORE_USERS = ("promote", "evaluate", *COMMANDS)  # what reads or writes storage.uri
# the params sections each command reads, shown by its --help
COMMAND_SECTIONS = {
    "create-store": ("storage",),
    "versions": ("storage",),
    "rollback": ("storage", "registry"),
    "remove": ("storage",),
    "restore": ("storage",),
    "serve": ("serve", "storage"),
    "refresh": ("validate", "featurize", "embed", "index", "evaluate", "promote", "storage"),
}
# the shared sections a step reads besides its own, shown by its --help
STEP_SECTIONS = {"evaluate": ("storage",), "promote": ("storage", "registry")}
# what `refresh` sets whatever params.yaml says, for its --help
REFRESH_SETS = dict(override.split("=", 1) for override in REFRESH)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components",
        description="Multi-view listing embeddings: run one pipeline step.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every step and command takes --params FILE and --set SECTION.KEY=VALUE "
        "(before or after its name); its --help lists its params.\n\nshared params:\n"
        + "\n".join(
            describe_section(SECTIONS[name], prefix=f"{name}.") for name in ("paths", "registry")
        )
        + "\n"
        + describe_top_level(),
    )
    _common(parser, before=True)
    parser.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON schema of params.yaml (for editors and reviewers) and exit",
    )
    sub = parser.add_subparsers(dest="step", metavar="<step>", title="steps and commands")
    for step in STEPS.values():
        command = sub.add_parser(
            step.name,
            help=step.help,
            description=f"{step.name}: {step.help}\n\nreads: {_listed(step.reads)}"
            f"\nwrites: {_listed(step.outputs)}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_sections_help((step.name, *STEP_SECTIONS.get(step.name, ()))),
        )
        _common(command)
        if step.name in SHARDED_STEPS:
            sharding = command.add_mutually_exclusive_group()
            sharding.add_argument(
                "--shard",
                metavar="I/N",
                help="run on shard I of N only (listings partitioned by a hash of their id)",
            )
            sharding.add_argument(
                "--gather",
                type=int,
                metavar="N",
                help="write the step's outputs from its N finished shards",
            )
    for name, help_ in COMMANDS.items():
        command = sub.add_parser(
            name,
            help=help_,
            description=f"{name}: {help_}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_sections_help(
                COMMAND_SECTIONS[name], REFRESH_SETS if name == "refresh" else None
            ),
        )
        _common(command)
        if name == "rollback":
            command.add_argument("--to", metavar="VERSION", help="version to make current")
        if name in TOMBSTONE_COMMANDS:
            command.add_argument("listing_ids", nargs="*", metavar="LISTING_ID")
            command.add_argument(
                "--from",
                dest="from_file",
                type=Path,
                metavar="FILE",
                help="more listing ids, one per line ('-': standard input)",
            )
            command.add_argument("--reason", help="why, recorded in the store")
    return parser


def _sections_help(sections, fixed: dict[str, str] | None = None) -> str:
    """The params of `sections`, each under its heading (`fixed`: keys the command sets)."""
    return "\n".join(
        f"params ({section} section, set with --set {section}.KEY=VALUE):\n"
        + describe_section(SECTIONS[section], prefix=f"{section}." if fixed else "", fixed=fixed)
        for section in sections
    )


def _listed(artifacts) -> str:
    return ", ".join(f"{a.step}/{a.name}" for a in artifacts) or "nothing"


def _common(parser: argparse.ArgumentParser, before: bool = False) -> None:
    """--params, --set, --set-json and -v; `before`: the copies taken before the step's
    name (`python -m components --set k=v versions`), merged with the step's own in
    `_merged` (argparse would let the step's defaults overwrite them under one name)."""
    dest = "before_" if before else ""
    parser.add_argument(
        "--params",
        dest=f"{dest}params",
        metavar="FILE",
        default=None if before else DEFAULT_PARAMS,
        help=f"params file (default: {DEFAULT_PARAMS})",
    )
    parser.add_argument(
        "--set",
        dest=f"{dest}overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one params key (repeatable); VALUE is YAML",
    )
    parser.add_argument(
        "--set-json",
        dest=f"{dest}overrides_json",
        default=None,
        metavar="JSON",
        help="more overrides as a JSON list of SECTION.KEY=VALUE strings (for orchestrators)",
    )
    parser.add_argument(
        "-v", "--verbose", dest=f"{dest}verbose", action="store_true", help="debug logging"
    )


def _merged(args: argparse.Namespace) -> argparse.Namespace:
    """The options given before the step's name joined to those given after it (after
    wins for --params; --set from both, before's first)."""
    if args.before_params is not None and args.params == DEFAULT_PARAMS:
        args.params = args.before_params
    args.overrides = args.before_overrides + args.overrides
    json_overrides = _json_overrides(args.before_overrides_json)
    args.overrides_json_list = json_overrides + _json_overrides(args.overrides_json)
    args.verbose = args.verbose or args.before_verbose
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(Params.model_json_schema(by_alias=True), indent=2))
        return 0
    if args.step is None:
        parser.print_help()
        return 2
    try:
        args = _merged(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _setup_logging(args.verbose)
    try:
        params = load_params(args.params, args.overrides + args.overrides_json_list)
        if args.step == "serve":
            from components.service.server import serve

            serve(params, os.environ.get("MLFLOW_TRACKING_URI"))  # until interrupted
            return 0
        if args.step == "refresh":
            from components import refresh

            result = refresh.run(params, os.environ.get("MLFLOW_TRACKING_URI"))
            if _is_rank_zero():
                print(result.summary)
            return 0
        if args.step in COMMANDS:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
            removing = {}
            if args.step in TOMBSTONE_COMMANDS:
                ids = args.listing_ids + _ids_from(args.step, args.from_file)
                removing = {"listing_ids": ids, "reason": args.reason}
            to = getattr(args, "to", None)
            print(run_command(args.step, params, tracking_uri, to, **removing))
            return 0
        result = run_step(
            args.step,
            params,
            os.environ.get("MLFLOW_TRACKING_URI"),
            shard=getattr(args, "shard", None),
            gather=getattr(args, "gather", None),
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        if err.report and _is_rank_zero():
            print(err.report)
        print(f"error: {args.step} failed: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        # Bad input named by the step (a broken catalog file, a missing upstream output).
        print(f"error: {args.step}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if _is_tracking_error(err):
            # the tracking server is down or refused: which server, and what it said
            where = _tracking_location(params, os.environ.get("MLFLOW_TRACKING_URI"))
            print(f"error: {args.step}: MLflow at {where}: {_first_line(err)}", file=sys.stderr)
            return 1
        if not _is_storage_error(err):
            raise
        # S3 said no (a missing bucket, access denied, an unreachable endpoint): the message
        # names the operation and the bucket; credentials are never part of it
        where = f" [storage.uri: {params.storage.uri}]" if args.step in STORE_USERS else ""
        print(f"error: {args.step}: S3: {err}{where}", file=sys.stderr)
        return 1
    if _is_rank_zero():  # under torchrun every rank runs the step; one prints its summary
        print(result.summary)
    return 0


def _ids_from(command: str, source: Path | None) -> list[str]:
    if source is None:
        return []
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text()
    except OSError as err:
        raise ConfigError(f"{command} --from {source}: cannot read ({err.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _json_overrides(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--set-json: not JSON: {err}") from err
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("--set-json: expected a JSON list of SECTION.KEY=VALUE strings")
    return overrides


def _is_tracking_error(err: Exception) -> bool:
    return type(err).__module__.startswith("mlflow")


def _tracking_location(params: Params, tracking_uri: str | None) -> str:
    """The tracking URI without credentials (user:password@ is dropped)."""
    from urllib.parse import urlsplit, urlunsplit

    uri = StepPaths.from_params(params, tracking_uri).mlflow_uri
    parts = urlsplit(uri)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _is_storage_error(err: Exception) -> bool:
    return type(err).__module__.startswith(("botocore", "boto3"))


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_step(
    name: str,
    params: Params,
    tracking_uri: str | None = None,
    shard: str | None = None,
    gather: int | None = None,
) -> Any:
    """Run one step with its params section; the function the CLI, the Airflow tasks and
    the Kubeflow components all call, holding the workdir's lock (one step at a time per
    workdir; the shards of one step side by side). `tracking_uri`: MLflow's (None: a
    sqlite file in the work dir). `shard` ("I/N") runs one shard of a sharded step,
    `gather` (N) writes its outputs from its N shards."""
    if name not in STEPS:
        raise ConfigError(f"unknown step '{name}'; steps are {list(STEPS)}")
    step = STEPS[name]
    paths = StepPaths.from_params(params, tracking_uri)
    config = params.section(step.name)
    if (shard is not None or gather is not None) and name not in SHARDED_STEPS:
        raise ConfigError(f"{name} does not run in shards; the sharded steps are {SHARDED_STEPS}")
    module = importlib.import_module(f"components.{name}")  # on use: --help stays fast
    if shard is not None:
        from components.core.shards import Shard  # the sharded steps import core anyway

        try:
            part = Shard.parse(shard)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        with holding(paths.workdir, step.name, part.name):
            return module.run(config, paths, shard=part)
    if gather is not None:
        with holding(paths.workdir, step.name):
            return module.gather(config, paths, gather)
    if not _is_rank_zero():  # under torchrun every rank runs the step: rank 0 holds the lock
        return module.run(config, paths)
    with holding(paths.workdir, step.name):
        return module.run(config, paths)


def run_command(
    name: str,
    params: Params,
    tracking_uri: str | None = None,
    to: str | None = None,
    listing_ids: list[str] | None = None,
    reason: str | None = None,
) -> str:
    """Run an operator command (`create-store`, `versions`, `rollback`, `remove`,
    `restore`) and return what it prints."""
    from components import promote

    paths = StepPaths.from_params(params, tracking_uri)
    if name == "remove":
        return promote.remove(paths, listing_ids or [], reason)
    if name == "restore":
        return promote.restore(paths, listing_ids or [], reason)
    if name == "versions":
        return promote.versions(paths)
    if name == "rollback":
        return promote.rollback(paths, to)
    if name == "create-store":
        return promote.create_store(paths)
    raise ConfigError(f"unknown command '{name}'; commands are {sorted(COMMANDS)}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_libraries()


NOISY = ("great_expectations", "botocore", "urllib3", "PIL", "fontTools", "faiss")


def quiet_libraries() -> None:
    """Libraries' chatter at warning level and above only (Great Expectations alone logs
        some 170 'Skipping registering function' lines at INFO on import), Python warnings as
        log records at WARNING, and MLflow's records through the host's handlers (MLflow
        otherwise writes them to stderr itself, which task logs show as errors), and off a terminal
    no artifact download bar from MLflow. Call it before
        the steps import their libraries: the CLI does, and so does an Airflow task."""
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if not sys.stderr.isatty():  # a task log: its bar would land as error lines
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
