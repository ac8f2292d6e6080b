"""The command line: parse, load config, call one action, render; map errors to exit codes.

Exit codes (README, "Exit codes"): 0 success, 1 failure, 2 usage or configuration error,
3 partial success, 4 another run holds the lock, 130/143 stopped by SIGINT/SIGTERM.
:func:`_guard` is the only place that turns exceptions into codes; tracebacks are shown only
with ``--verbose``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from conexa_backup import __version__, completion, signals
from conexa_backup.errors import ConexaError, ConfigError, ExitCode, PartialFailure, UsageError
from conexa_backup.logs import LOGGER, start_file_log, stop_file_logs

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context, Reporter
    from conexa_backup.actions.recover import Settled
    from conexa_backup.notify.base import Event, Kind

# Start-up time matters (monitoring runs `status` every few minutes, the API's jobs start the
# CLI): each command imports the actions, renderers and libraries it needs when it runs, so
# `--version`, `list` and `status` never load psycopg, the charts or the cloud SDKs.

T = TypeVar("T")

GLOBAL_OPTIONS = ("config", "verbose", "quiet")  # also accepted after the command's name


class _Group(typer.core.TyperGroup):
    """The command group, with two changes made once for every command:

    - the global options (:data:`GLOBAL_OPTIONS`) are accepted after the command's name too
      (``conexa-backup list --config X``); given in both places, the later one wins;
    - help shows no value placeholder for a flag, and marks list options as repeatable.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        shared = [p for p in self.params if p.name in GLOBAL_OPTIONS]
        commands = _all_commands(self)
        for command in commands:  # those of `config` and `serve token` too
            for param in shared:
                again = copy.copy(param)
                again.expose_value = False  # the command's function does not take it
                again.callback = _global_option_given
                command.params.append(again)
        for param in [*self.params, *(p for c in commands for p in c.params)]:
            _plain_metavar(param)

    def get_params(self, ctx: Any) -> Any:
        """Every option, the shell-completion flags Typer adds later included, shown bare."""
        params = super().get_params(ctx)
        for param in params:
            _plain_metavar(param)
        return params

    def get_help_option(self, ctx: Any) -> Any:
        """``--help``, made on first use (hence not in ``__init__``), shown like any flag."""
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_metavar(option)
        return option

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_metavar(command.get_help_option(ctx))
        return command


def _all_commands(group: Any) -> list[Any]:
    """The commands under ``group``, those of its sub-groups (and the sub-groups) included."""
    found: list[Any] = []
    for command in group.commands.values():
        found.append(command)
        if hasattr(command, "commands"):
            found += _all_commands(command)
    return found


def _plain_metavar(param: Any) -> None:
    """``--json`` rather than ``--json <bool>``; ``--target <str> (repeatable)`` rather
    than ``<list[str]>``."""
    if param is None:
        return
    if getattr(param, "is_flag", False):
        param.metavar = ""
    elif getattr(param, "multiple", False) and param.metavar is None:
        item = param.bare_type().removeprefix("list[").removesuffix("]")
        param.metavar = f"<{item}> (repeatable)"


def _global_option_given(ctx: Any, param: Any, value: Any) -> None:
    """A global option given after the command's name: apply it (default values, meaning
    "not given here", leave what the options before the name set)."""
    if value:
        _apply_globals(**{param.name: value})


# Commands grouped as a sysadmin thinks of them, in `--help`.
DAILY, RECOVERY, MAINTENANCE, SETUP, API = (
    "Every day", "Recovery", "Maintenance", "Setting up", "The admin panel's API")

app = typer.Typer(
    cls=_Group,
    name="conexa-backup",
    help="Backups of the Conexa PostgreSQL database and uploads folder that you can restore.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class State:
    config_path: Path | None = None
    verbose: bool = False
    quiet: bool = False
    # Not a terminal (cron, a pipe): wide enough that tables never cut an id.
    out: Console = field(default_factory=lambda: Console(
        soft_wrap=True, width=None if sys.stdout.isatty() else 160))
    err: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))
    secrets: list[str] = field(default_factory=list)
    # Whose secrets to add on first use: reading them parses the database URL (psycopg),
    # which `list` and `status` need not load unless they have an error to redact.
    secrets_of: Context | None = None


STATE = State()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
TargetOpt = Annotated[
    list[str] | None,
    typer.Option("--target", "-t", help="Only this target.",
                 autocompletion=completion.target_names),
]
RefArg = Annotated[str, typer.Argument(help="Backup id, or 'latest'.",
                                       autocompletion=completion.backup_ids)]


def _redact(text: str) -> str:
    if STATE.secrets_of is not None:
        ctx, STATE.secrets_of = STATE.secrets_of, None
        with contextlib.suppress(ConexaError):
            STATE.secrets = ctx.secrets()
    for secret in STATE.secrets:
        text = text.replace(secret, "********")
    return text


def _fail(message: str, code: ExitCode, as_json: bool = False) -> NoReturn:
    """The one way a command fails: an ``error:`` line on stderr and exit ``code``; with
    ``as_json`` (a ``--json`` command that printed no answer) also the JSON error document
    ``{"ok": false, "error": ..., "exit_code": N}`` on stdout."""
    text = _redact(message)
    if as_json:
        from conexa_backup import render
        render.print_json(STATE.out, render.error_json(text, int(code)))
    STATE.err.print(f"[red]error:[/] {escape(text)}", highlight=False)
    raise typer.Exit(int(code))


def _guard(fn: Callable[[], T], *, as_json: bool = False) -> T:
    """Run an action; turn known errors into one line and their exit code (and, with
    ``as_json``, the JSON error document on stdout: see :func:`_fail`)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except ConexaError as exc:
        if STATE.verbose:
            STATE.err.print(_redact(traceback.format_exc()), markup=False)
        hint = f" ({exc.hint})" if exc.hint else ""
        _fail(f"{exc}{hint}" + "".join(f"; {n}" for n in _left(exc)), exc.exit_code, as_json)
    except KeyboardInterrupt as exc:
        _interrupted(exc, as_json)
    except Exception as exc:  # a bug: say so, briefly, unless asked for details
        if STATE.verbose:
            STATE.err.print(_redact(traceback.format_exc()), markup=False)
        _fail(f"unexpected {type(exc).__name__}: {exc} (a bug; run with --verbose for details)",
              ExitCode.FAILURE, as_json)


def _interrupted(exc: KeyboardInterrupt, as_json: bool = False) -> NoReturn:
    how = f" by {exc.args[0]}" if exc.args else ""
    left = "; ".join(_left(exc)) or "partial work was removed"
    _fail(f"interrupted{how}; {left}", signals.exit_code(exc), as_json)


def _left(exc: BaseException) -> list[str]:
    """What the run could not clean up on its way out, when it says so (a note the action
    added to the exception, e.g. a failed backup it could not remove from a target)."""
    return [str(note) for note in getattr(exc, "__notes__", [])]


def _context(reporter: Reporter | None = None) -> Context:
    from conexa_backup.actions.context import Context, NullReporter
    from conexa_backup.config import load_config
    from conexa_backup.config.loading import permission_warning
    config, path = load_config(STATE.config_path)
    with contextlib.suppress(OSError):
        warning = permission_warning(path, path.read_text(encoding="utf-8"))
        if warning:
            STATE.err.print(f"warning: {escape(warning)}", highlight=False)
    ctx = Context(config, path, reporter or NullReporter())
    STATE.secrets_of = ctx
    return ctx


@contextlib.contextmanager
def _session(what: str, *, lock: bool, log_file: bool = True, progress: bool = True,
             alert: Kind | None = None,
             settled: list[Settled] | None = None) -> Iterator[Context]:
    """Config, log file, lock and (on a terminal) a progress display for one command.

    With ``lock``, first settles what killed runs left (``recover.settle``): said as warnings
    on stderr, or appended to ``settled``. With ``alert``, a failure (or interruption) is
    recorded and sent to the notifiers, and a backup pings heartbeat monitors when it starts.
    """
    from conexa_backup import events, render
    from conexa_backup.notify.base import Event
    started = time.monotonic()
    show = progress and not STATE.quiet and STATE.err.is_terminal
    reporter = render.ProgressReporter(STATE.err) if show else None
    ctx = _context(reporter)
    with contextlib.ExitStack() as stack:
        try:
            if log_file:
                ctx.state_dir()
                start_file_log(ctx.config.state_dir)
                stack.callback(stop_file_logs)
            if lock:
                from conexa_backup.actions import recover
                from conexa_backup.locking import run_lock
                stack.enter_context(run_lock(ctx.state_dir(), what))
                done = recover.settle(ctx)  # what killed runs left: before any new work
                for line in done.lines():
                    logging.getLogger(LOGGER).warning("%s", line)
                if settled is not None:  # `recover` reports it as its answer
                    settled.append(done)
                else:
                    if done.journal:
                        STATE.err.print(f"warning: {escape(done.journal)}", highlight=False)
                    if done.removed:
                        STATE.err.print(f"warning: removed {len(done.removed)} database(s) "
                                        "or folder(s) left by a killed run: "
                                        f"{escape(', '.join(done.removed))}", highlight=False)
            if reporter is not None:
                stack.enter_context(reporter)
            if alert == "backup":
                _alert(ctx, Event("backup", "start", "backup started"))
            yield ctx
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:  # logged while the log file is open
            log = logging.getLogger(LOGGER)
            if isinstance(exc, KeyboardInterrupt):
                how = f" by {exc.args[0]}" if exc.args else ""
                log.error("%s interrupted%s", what, how)
            elif isinstance(exc, ConexaError):
                log.error("%s failed: %s", what, _redact(str(exc)))
            else:  # a bug: keep the traceback for whoever debugs it (redacted)
                log.error("%s failed unexpectedly:\n%s", what, _redact(traceback.format_exc()))
            if alert is not None:
                _alert(ctx, events.failure_event(alert, exc, time.monotonic() - started))
            raise


def _alert(ctx: Context, event: Event) -> None:
    """Record a run's outcome, update the metrics file, tell the notifiers.

    Nothing here may change the run's result: problems become warnings on stderr.
    """
    from conexa_backup.actions import monitor
    from conexa_backup.notify.dispatch import dispatch
    from conexa_backup.state import record_run
    # Error texts come from libraries and servers: no secret leaves through them either.
    event.error = _redact(event.error) if event.error else event.error
    event.title = _redact(event.title)
    event.targets_failed = {k: _redact(v) for k, v in event.targets_failed.items()}
    try:
        if event.outcome != "start" and event.kind != "test":
            record_run(ctx.state_dir(), event.to_json())
            monitor.write_metrics(ctx)
    except (OSError, ConexaError) as exc:
        STATE.err.print(f"warning: could not record the run: {escape(str(exc))}")
    for delivery in dispatch(ctx.config.notify, event):
        if not delivery.ok:
            STATE.err.print(f"warning: notification via {escape(delivery.notifier)} failed: "
                            f"{escape(_redact(delivery.detail))}", highlight=False)


def _emit(as_json: bool, data: Callable[[], Any], human: Callable[[Console], None]) -> None:
    from conexa_backup import render
    if as_json:
        render.print_json(STATE.out, data())
    elif not STATE.quiet:
        human(STATE.out)


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question}: pass --yes to confirm")
    if not typer.confirm(question + "?", default=False, err=True):
        raise UsageError("cancelled")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"conexa-backup {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Config file (default: $CONEXA_BACKUP_CONFIG, ./backup.toml, "
        "/etc/conexa-backup/backup.toml).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr; "
                                          "show tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    STATE.config_path, STATE.verbose, STATE.quiet = None, False, False
    STATE.secrets, STATE.secrets_of = [], None
    _apply_globals(config=config, verbose=verbose, quiet=quiet)


def _apply_globals(config: Path | None = None, verbose: bool = False,
                   quiet: bool = False) -> None:
    """Set what the global options ask for; an option not given (None, False) changes
    nothing."""
    if config is not None:  # after the command's name it comes as click gives it: a str
        STATE.config_path = Path(config)
    if quiet:
        STATE.quiet = True
    if verbose and not STATE.verbose:  # one stderr handler, however often -v is given
        STATE.verbose = True
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger(LOGGER)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)


@app.command(rich_help_panel=DAILY)
def backup(
    as_json: JsonOpt = False,
    target: TargetOpt = None,
    no_prune: Annotated[bool, typer.Option(
        "--no-prune", help="Do not apply retention after the backup.")] = False,
    accept_shrink: Annotated[bool, typer.Option(
        "--accept-shrink", help="The uploads folder shrank on purpose: no warning, and "
        "later backups are compared with this one.")] = False,
    backup_id: Annotated[str | None, typer.Option(
        "--id", hidden=True, help="Store the backup under this id (the API server picks it "
        "ahead, to answer it at once); refused if taken.")] = None,
    rehash: Annotated[bool, typer.Option(
        "--rehash", help="Packs format: read every uploads file, whatever the file cache "
        "says (a stale cache then cannot hide a change).")] = False,
    allow_clock_skew: Annotated[bool, typer.Option(
        "--allow-clock-skew", help="Store the backup even though this host's clock is behind "
        "the newest backup's time (it is then filed before it).")] = False,
) -> None:
    """Dump the database, archive uploads, store on every target, commit. Prints the id."""
    from conexa_backup import events
    from conexa_backup.actions.backup import run_backup
    def act() -> None:
        with _session("backup", lock=True, alert="backup") as ctx:
            try:
                result = run_backup(ctx, target_names=target, prune=not no_prune,
                                    accept_shrink=accept_shrink, backup_id=backup_id,
                                    rehash=rehash, allow_clock_skew=allow_clock_skew)
            except PartialFailure as exc:
                if exc.result is not None:
                    _show_backup(exc.result, as_json)
                raise
            _alert(ctx, events.backup_event(result))
        _show_backup(result, as_json)
        if result.warnings:
            _fail(f"backup {result.id} complete with {len(result.warnings)} warning(s): "
                  + "; ".join(result.warnings), ExitCode.PARTIAL)
        if result.prune_errors:
            _fail("backup complete, but pruning failed: " + "; ".join(result.prune_errors),
                  ExitCode.PARTIAL)
    _guard(act)


def _show_backup(result: Any, as_json: bool) -> None:
    from conexa_backup import render
    if as_json:
        render.print_json(STATE.out, render.backup_json(result))
    elif STATE.quiet:
        return
    elif STATE.out.is_terminal:
        render.backup_human(STATE.out, result)
    else:
        STATE.out.print(result.id, markup=False, highlight=False)


@app.command("list", rich_help_panel=DAILY)
def list_(as_json: JsonOpt = False, target: TargetOpt = None) -> None:
    """Every backup: id, time, size, where it is stored, status."""
    from conexa_backup import render
    from conexa_backup.actions import inspect
    from conexa_backup.state import RESTORE_PENDING, last_drills, restore_pending
    def act() -> None:
        unreachable: dict[str, str] = {}
        with _session("list", lock=False, log_file=False, progress=False) as ctx:
            backups = inspect.list_backups(ctx, target, unreachable)
            proven = last_drills(ctx.config.state_dir)
        _emit(as_json, lambda: [render.backup_entry(b, proven) for b in reversed(backups)],
              lambda c: render.list_human(c, backups, proven))
        if restore_pending(ctx.config.state_dir):  # worse than any listing problem
            _fail(RESTORE_PENDING, ExitCode.FAILURE)
        if unreachable:
            _fail("could not list " + "; ".join(unreachable.values()), ExitCode.PARTIAL)
        if backups and not any(b.good_copies for b in backups):
            # Like verify: a list of backups none of which could be restored is a failure,
            # whatever the table says (cron and scripts see the exit code, not the table).
            _fail(f"none of the {len(backups)} backup(s) listed has a usable copy (each is "
                  f"damaged or incomplete)", ExitCode.FAILURE)
    _guard(act)


@app.command(rich_help_panel=RECOVERY)
def restore(
    ref: RefArg = "latest",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Confirm replacing live data.")] = False,
    to_database: Annotated[str | None, typer.Option(
        help="Restore into this new database and leave the live one alone.")] = None,
    uploads_to: Annotated[Path | None, typer.Option(
        help="Extract uploads into this new or empty folder instead of the live one.")] = None,
    only: Annotated[str | None, typer.Option(help="Restore only 'database' or 'uploads'.")] = None,
    no_safety_backup: Annotated[bool, typer.Option(
        "--no-safety-backup", help="Skip the backup of the live state taken first.")] = False,
    source: Annotated[str | None, typer.Option(
        "--from", "--target", help="Read from this target.",
        autocompletion=completion.target_names)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore database and uploads: proven in a fresh copy first, then swapped in."""
    from conexa_backup import events, render
    from conexa_backup.actions.restore import RestoreOptions, run_restore
    def act() -> None:
        if only not in (None, "database", "uploads"):
            raise UsageError("--only must be 'database' or 'uploads'")
        in_place_db = only != "uploads" and to_database is None
        in_place_up = only != "database" and uploads_to is None
        if in_place_db or in_place_up:
            _confirm(f"restore {ref} over the live "
                     + " and ".join(p for p, live in (("database", in_place_db),
                                                       ("uploads", in_place_up)) if live), yes)
        opts = RestoreOptions(ref, to_database, uploads_to, only,  # type: ignore[arg-type]
                              not no_safety_backup, source)
        with _session("restore", lock=True, alert="restore") as ctx:
            result = run_restore(ctx, opts)
            result.fallbacks = [_redact(note) for note in result.fallbacks]  # storage errors
            _alert(ctx, events.restore_event(result))
        for note in result.fallbacks:  # a damaged copy or backup passed over: say so, not only logs
            STATE.err.print(f"warning: {escape(note)}", highlight=False)
        _emit(as_json, lambda: render.restore_json(result),
              lambda c: render.restore_human(c, result))
    _guard(act)


@app.command(rich_help_panel=RECOVERY)
def recover(as_json: JsonOpt = False) -> None:
    """Finish or undo a restore a kill interrupted; remove what killed runs left behind."""
    def act() -> None:
        settled: list[Settled] = []
        with _session("recover", lock=True, settled=settled):
            pass  # the locked session does the work (every locked command does it first)
        done = settled[0]
        _emit(as_json, done.to_dict,
              lambda c: c.print("\n".join(done.lines()) or "nothing to recover",
                                markup=False, highlight=False))
    _guard(act, as_json=as_json)


@app.command(rich_help_panel=RECOVERY)
def verify(
    ref: RefArg = "latest",
    all_backups: Annotated[bool, typer.Option("--all", help="Every backup.")] = False,
    target: TargetOpt = None,
    drill: Annotated[bool, typer.Option(
        "--drill", help="Restore into a throwaway database and folder and prove it complete, "
        "within the RTO.")] = False,
    source: Annotated[str | None, typer.Option(
        "--from", help="With --drill: the target whose copy to drill (--target works "
        "too).", autocompletion=completion.target_names)] = None,
    all_targets: Annotated[bool, typer.Option(
        "--all-targets", help="With --drill: drill the copy on every target.")] = False,
    junit: Annotated[Path | None, typer.Option(
        help="With --drill: write a JUnit XML report here (one test case per check).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-read every stored artifact and check it; with --drill, prove the backup restores."""
    from conexa_backup import render
    from conexa_backup.actions import inspect
    from conexa_backup.notify.base import Event
    def act() -> None:
        if drill:
            _drill(ref, _drill_source(source, target), all_targets, junit, as_json)
            return
        if source or all_targets or junit:
            raise UsageError("--from, --all-targets and --junit go with --drill")
        with _session("verify", lock=False, alert="verify") as ctx:
            notes: list[str] = []
            with _notes(notes):
                checks = inspect.verify(ctx, ref, all_backups=all_backups,
                                        target_names=target, notes=notes)
            bad = [f"{c.backup_id} on {c.target}: {'; '.join(c.problems)}"
                   for c in checks if not c.ok]
            _alert(ctx, Event("verify", "failure", "verification FAILED",
                              error="\n".join(bad)) if bad else
                   Event("verify", "success", f"verification passed ({len(checks)} copies)"))
        _emit(as_json, lambda: render.verify_json(checks),
              lambda c: render.verify_human(c, checks))
        if not checks or not all(c.ok for c in checks):
            raise typer.Exit(int(ExitCode.FAILURE))
    _guard(act, as_json=as_json)  # failed before its answer: a JSON error document


@contextlib.contextmanager
def _notes(notes: list[str]) -> Iterator[None]:
    """Say on stderr, once the block is done (failed or not), what ``latest`` passed over, or
    that it named a damaged or suspect backup (``catalog.resolve``): which backup a command
    used must never be a surprise."""
    try:
        yield
    finally:
        for note in notes:
            STATE.err.print(f"warning: {escape(note)}", highlight=False)


def _drill_source(source: str | None, targets: list[str] | None) -> str | None:
    """With --drill, ``--target NAME`` says what ``--from NAME`` says (one target)."""
    names = [*([source] if source else []), *(targets or [])]
    if len(set(names)) > 1:
        raise UsageError("--drill takes one target (--from or --target); "
                         "--all-targets drills every one")
    return names[0] if names else None


def _drill(ref: str, source: str | None, all_targets: bool, junit: Path | None,
           as_json: bool) -> None:
    from conexa_backup import events, render
    from conexa_backup.actions.drill import run_drills
    if source and all_targets:
        raise UsageError("--from and --all-targets exclude each other")
    with _session("drill", lock=False, alert="drill") as ctx:
        notes: list[str] = []
        with _notes(notes):
            results = run_drills(ctx, ref, source=source, all_targets=all_targets, notes=notes)
        _alert(ctx, events.drill_event(results))
    if junit is not None:
        try:
            junit.write_text(render.drill_junit(results), encoding="utf-8")
        except OSError as exc:
            raise ConexaError(f"cannot write {junit}: {exc.strerror}") from None
    _emit(as_json, lambda: render.drills_json(results), lambda c: render.drills_human(c, results))
    if any(not r.ok and r.not_run is None for r in results):
        raise typer.Exit(int(ExitCode.FAILURE))
    unrun = [r for r in results if r.not_run is not None]
    if unrun:  # the answer is printed: the error line only (exit 2, a host not set up)
        _fail(f"could not drill {unrun[0].backup_id} on "
              f"{', '.join(r.target for r in unrun)}: {unrun[0].not_run}", ExitCode.USAGE)


@app.command(rich_help_panel=DAILY)
def status(as_json: JsonOpt = False) -> None:
    """Health of every target; Nagios exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    from conexa_backup import render
    from conexa_backup.actions import monitor
    def act() -> None:
        try:
            with _session("status", lock=False, log_file=False, progress=False) as ctx:
                health = monitor.health(ctx)
        except ConexaError as exc:  # status speaks Nagios: what it cannot read is UNKNOWN
            summary = _redact(str(exc))
            if as_json:
                render.print_json(STATE.out, {"status": "UNKNOWN", "code": 3,
                                              "summary": summary})
            else:
                STATE.out.print(f"CONEXA-BACKUP UNKNOWN - {escape(summary)}")
            raise typer.Exit(3) from None
        _emit(as_json, lambda: render.status_json(health),
              lambda c: render.status_human(c, health))
        raise typer.Exit(health.level)
    _guard(act)


@app.command(rich_help_panel=RECOVERY)
def download(
    ref: RefArg,
    to: Annotated[Path, typer.Option("--to", help="Folder to put <id>/ in.")],
    source: Annotated[str | None, typer.Option(
        "--from", "--target", help="Read from this target (default: the first good copy).",
        autocompletion=completion.target_names)] = None,
) -> None:
    """Fetch a backup's files as stored, plus its manifest, checking every byte."""
    from conexa_backup import render
    from conexa_backup.actions import inspect
    def act() -> None:
        read_from: dict[str, str] = {}
        with _session("download", lock=False) as ctx:
            notes: list[str] = []
            with _notes(notes):
                _, folder = inspect.download(ctx, ref, to, source, notes, read_from)
        if not STATE.quiet:  # stdout: the folder alone (scripts use it); where from: stderr
            for line in render.read_from_lines(read_from):
                STATE.err.print(line, markup=False, highlight=False)
            STATE.out.print(str(folder), markup=False, highlight=False)
    _guard(act)


@app.command(rich_help_panel=MAINTENANCE)
def delete(
    backup_id: Annotated[str, typer.Argument(help="Backup id.",
                                             autocompletion=completion.backup_ids)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Confirm.")] = False,
    target: TargetOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Delete copies prune always keeps too (the newest, the newest "
                        "verified, object-locked, unreadable).")] = False,
) -> None:
    """Remove one backup, manifest first; a copy prune always keeps stays unless --force."""
    from conexa_backup.actions.delete import delete as run_delete
    def act() -> None:
        _confirm(f"delete backup {backup_id}", yes)
        with _session("delete", lock=True) as ctx:
            result = run_delete(ctx, backup_id, target, force=force)
        for name, why in result.kept.items():
            STATE.err.print(f"kept on {name}: {why} (--force deletes it)", markup=False,
                            highlight=False)
        for name, why in result.unreachable.items():
            STATE.err.print(f"warning: not listed: {name}: {why}", markup=False,
                            highlight=False)
        if not result.deleted:
            raise ConexaError(f"backup {backup_id} was not deleted: prune always keeps it",
                              hint="--force deletes it anyway")
        if not STATE.quiet:
            STATE.out.print(f"deleted {backup_id} from {', '.join(result.deleted)}",
                            markup=False)
    _guard(act)


@app.command(rich_help_panel=MAINTENANCE)
def prune(
    target: TargetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; delete nothing.")]
    = False,
    at: Annotated[str | None, typer.Option(
        "--at", help="Preview the policy as of this time (ISO 8601, UTC if no zone); "
        "implies --dry-run.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply each target's retention policy, showing why each backup stays or goes."""
    from conexa_backup import events, render
    from conexa_backup.actions.prune import problems as prune_problems
    from conexa_backup.actions.prune import prune as run_prune
    def act() -> None:
        when = _parse_time(at) if at else None
        preview = dry_run or when is not None  # --at previews: never delete by a future clock
        with _session("prune", lock=not preview, alert=None if preview else "prune") as ctx:
            results = run_prune(ctx, target, dry_run=preview, at=when)
            if not preview:
                _alert(ctx, events.prune_event(results))
        _emit(as_json, lambda: [render.prune_entry(p) for p in results],
              lambda c: render.prune_human(c, results, preview))
        problems = prune_problems(results)
        problems += [f"{p.target}: {p.skipped}" for p in results if p.skipped]
        if problems:
            _fail("prune incomplete: " + "; ".join(problems), ExitCode.PARTIAL)
    _guard(act)


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r}: not an ISO 8601 time (e.g. 2026-12-31T00:00Z)") \
            from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@app.command(rich_help_panel=DAILY)
def report(
    days: Annotated[int, typer.Option("--days", min=1, help="Length of the period.")] = 7,
    send: Annotated[bool, typer.Option(
        "--send", help="Also send it through the notifiers that take 'report' events (every "
        "notifier when none does; printed instead when there is none).")] = False,
    html: Annotated[Path | None, typer.Option(
        "--html", dir_okay=False, help="Also write it as one self-contained HTML page (charts "
        "and tables inline: opens anywhere, with no network) to this file, 0600.")] = None,
    lang: Annotated[str, typer.Option(
        "--lang", help="The HTML page's language: en or pt.")] = "en",
    as_json: JsonOpt = False,
) -> None:
    """Summary of a period: backups, failures, sizes, drills, RPO/RTO, storage and cost."""
    from conexa_backup import events, htmlreport, render
    from conexa_backup.actions import monitor
    from conexa_backup.actions.history import history
    from conexa_backup.notify.dispatch import dispatch
    def act() -> None:
        if lang not in htmlreport.LANGS:
            raise UsageError(f"--lang {lang!r}: use one of {', '.join(htmlreport.LANGS)}")
        with _session("report", lock=False, log_file=False, progress=False) as ctx:
            unreachable: dict[str, str] = {}
            catalog = ctx.scan(ctx.targets(), unreachable=unreachable)  # once, for both
            data = monitor.report(ctx, days, scanned=(catalog, unreachable))
            page = short = None
            if html is not None or send:  # sent as the email's HTML part, and to chat short
                hist = history(ctx, days, datetime.fromisoformat(data["to"]), catalog)
                page = htmlreport.report_html(data, hist, lang)
                short = htmlreport.summary(data, lang)
            if html is not None and page is not None:
                _write_file(html, page.encode())
            text = render.report_text(data)
            event = events.report_event(data, text, page, short)
            deliveries = dispatch(ctx.config.notify, event, requested=True) if send else []
        # Asked to send with nowhere to send: print it even with --quiet (cron mails it).
        unsent = send and not deliveries
        if as_json:
            render.print_json(STATE.out, {**data, "sent": [d.__dict__ for d in deliveries]})
        elif unsent or not STATE.quiet:
            STATE.out.print(text, markup=False, highlight=False)
        if unsent:
            STATE.err.print("warning: report not sent: no notifier that carries messages "
                            "(email, Slack, webhook) is configured; printed here instead",
                            markup=False, highlight=False)
        failed = [f"{d.notifier}: {d.detail}" for d in deliveries if not d.ok]
        if failed:
            _fail("report not sent via " + "; ".join(failed), ExitCode.FAILURE)
    _guard(act)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600, whole or not at all).

    Raises:
        ConexaError: it cannot be written (one line naming it).
    """
    from conexa_backup.state import atomic_write
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise ConexaError(f"cannot write {path}: {exc.strerror or exc}") from None


@app.command(rich_help_panel=SETUP)
def init(
    path: Annotated[Path, typer.Argument(help="Where to write it.")] = Path("backup.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter config file (mode 0600)."""
    from conexa_backup.actions import setup
    def act() -> None:
        written = setup.init(path, force=force)
        if not STATE.quiet:
            STATE.out.print(f"wrote {written}; edit it, then run `conexa-backup check`",
                            markup=False)
    _guard(act)


@app.command(rich_help_panel=SETUP)
def check(as_json: JsonOpt = False) -> None:
    """Validate the config and test every connection, without making a backup."""
    from conexa_backup import render
    from conexa_backup.actions import setup
    def act() -> None:
        with _session("check", lock=False, log_file=False, progress=False) as ctx:
            results = setup.check(ctx)
        _emit(as_json, lambda: render.check_json(results),
              lambda c: render.check_human(c, results))
        if not all(r.ok for r in results):
            raise typer.Exit(int(ExitCode.FAILURE))
    _guard(act)


@app.command("notify-test", rich_help_panel=SETUP)
def notify_test(as_json: JsonOpt = False) -> None:
    """Send a test message through every configured notifier; report each outcome."""
    from conexa_backup import events, render
    from conexa_backup.notify.dispatch import dispatch
    def act() -> None:
        with _session("notify-test", lock=False, log_file=True, progress=False) as ctx:
            if not ctx.config.notify:
                raise UsageError("no [[notify]] configured")
            deliveries = dispatch(ctx.config.notify, events.test_event())
        if as_json:
            render.print_json(STATE.out, {"ok": all(d.ok for d in deliveries),
                                          "notifiers": [d.__dict__ for d in deliveries]})
        elif not STATE.quiet:
            for d in deliveries:
                mark = "[green]ok[/]  " if d.ok else "[red]FAIL[/]"
                STATE.out.print(f"{mark} {escape(d.notifier)}: {escape(_redact(d.detail))}")
        if not all(d.ok for d in deliveries):
            raise typer.Exit(int(ExitCode.FAILURE))
    _guard(act)


config_app = typer.Typer(help="The config file: check one, or print the one in effect.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config", rich_help_panel=SETUP)


@config_app.command("validate")
def config_validate(
    path: Annotated[Path | None, typer.Argument(
        help="The file (default: the one every command reads: --config, "
             "$CONEXA_BACKUP_CONFIG, ./backup.toml, /etc/conexa-backup/backup.toml).")] = None,
) -> None:
    """Check a config file without connecting to anything: exit 0 when it is valid, 2 when
    not (for config management: Ansible's validate=)."""
    def act() -> None:
        from conexa_backup.config.loading import find_config, parse_config, read_text
        src = find_config(path or STATE.config_path)
        parse_config(read_text(src), src)
        if not STATE.quiet:
            STATE.out.print(f"{src}: valid", markup=False, highlight=False)
    _guard(act)


@config_app.command("show")
def config_show(as_json: JsonOpt = False) -> None:
    """Print the configuration in effect as TOML: defaults filled in, ${VAR}s and the seed's
    environment variables applied, secrets as ********, each value's origin as a comment."""
    def act() -> None:
        from conexa_backup.config import show
        from conexa_backup.config.loading import find_config
        doc, origin = show.effective(find_config(STATE.config_path))
        if as_json:
            from conexa_backup import render
            render.print_json(STATE.out, doc)
        else:
            STATE.out.file.write(show.to_toml(doc, origin))
    _guard(act)


serve_app = typer.Typer(help="The HTTP API for the admin panel (docs/server.md).",
                        invoke_without_command=True)
token_app = typer.Typer(help="Machine tokens: bearer tokens for scripts.", no_args_is_help=True)
serve_app.add_typer(token_app, name="token")
app.add_typer(serve_app, name="serve", rich_help_panel=API)


@serve_app.callback()
def serve(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option(
        "--listen", metavar="HOST:PORT",
        help="Address to serve on (default: [server] listen, 127.0.0.1:8765).")] = None,
) -> None:
    """Serve the admin API until SIGINT or SIGTERM (needs the 'server' extra)."""
    if ctx.invoked_subcommand is not None:
        return

    def act() -> None:
        try:  # the web stack is an optional extra, imported only here
            from conexa_backup.server import run
        except ImportError as exc:
            raise ConfigError(f"serve needs the server extra: pip install "
                              f"'conexa-backup[server]' ({exc.name} is missing)") from None
        context = _context()
        assert context.config_path is not None  # _context loaded it from a file
        run.log_to_stderr()
        run.serve(context.config, context.config_path, listen)
    _guard(act)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name for the token (audit log, revoking).")],
    role: Annotated[str, typer.Option("--role", help="A role of [server.auth]: what the "
                                      "token may do.")],
    as_json: JsonOpt = False,
) -> None:
    """Make a machine token and print it, once: only its SHA-256 is kept (state_dir)."""
    from conexa_backup import render
    from conexa_backup.server.tokens import issue_machine_token
    def act() -> str:
        return issue_machine_token(_context().config, name, role)
    token = _guard(act)
    # The token is the output, even with --quiet: lost here, it is lost for good.
    if as_json:
        render.print_json(STATE.out, {"name": name, "role": role, "token": token})
        return
    STATE.out.print(token, markup=False, highlight=False)
    if not STATE.quiet:
        STATE.err.print("(shown once: only its hash is kept; send it as 'Authorization: Bearer "
                        "<token>')", markup=False, highlight=False)


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """The machine tokens: name, role, creation time (never the tokens)."""
    from conexa_backup.server.tokens import machine_tokens
    found = _guard(lambda: machine_tokens(_context().config.state_dir))

    def human(console: Console) -> None:
        for t in found:
            console.print(f"{t.name}\t{t.role}\t{t.created}", markup=False, highlight=False)
    _emit(as_json, lambda: [vars(t) for t in found], human)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name (see `serve token list`).")],
) -> None:
    """Forget a machine token: requests bearing it are refused from now on."""
    from conexa_backup.server.tokens import revoke_machine_token
    _guard(lambda: revoke_machine_token(_context().config.state_dir, name))


def _tune_malloc() -> None:
    """Keep peak RSS flat on glibc (elsewhere a no-op; measured in docs/benchmarks.md).

    The byte path allocates and frees 1 MiB buffers in several threads, and cloud targets
    hold multi-MiB part buffers. glibc would give each thread its own arena and keep raising
    its mmap threshold, so the big buffers would fragment the heaps. Two arenas and a fixed
    4 MiB threshold keep part-sized buffers in mmap (returned when freed) while 1 MiB chunks
    stay on the fast heap path: a 256 KiB threshold cost 2.7x on the uploads stage (measured).
    """
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (also stops its dynamic growth)


def main() -> None:
    """Run the command line (``__main__.main`` installs the signal handlers first)."""
    signals.install()
    _tune_malloc()
    # We take read leases on pg_dump's finished files (archive.move_file); a writer opening
    # one meanwhile would send SIGIO, whose default action is to kill us.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        app()
    except KeyboardInterrupt as exc:  # while Typer builds the command line
        _exit_interrupted(exc)
    except SystemExit as done:
        # While Typer parses the command line, it turns a signal into a silent exit 130.
        stopped = getattr(done.__context__, "__cause__", None)
        if isinstance(stopped, KeyboardInterrupt):
            _exit_interrupted(stopped)
        raise


def _exit_interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """A signal outside any action (nothing to clean up): the same line and code as inside."""
    with contextlib.suppress(typer.Exit):
        _interrupted(exc)
    raise SystemExit(signals.exit_code(exc)) from None
