"""``python -m conexa_backup`` and the ``conexa-backup`` command.

This module stays light: the signal handlers go in before the program's imports (about half
a second), which run with SIGINT/SIGTERM held (:func:`conexa_backup.signals.held`), so a
signal during start-up exits 143/130 with the usual message.
"""

import sys

from conexa_backup import signals


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:] == ["--version"]:  # asked by scripts and monitoring: answered at once
        from conexa_backup import __version__
        sys.stdout.write(f"conexa-backup {__version__}\n")
        return
    try:
        signals.install()
        with signals.held():
            from conexa_backup.cli import main as cli_main
    except KeyboardInterrupt as exc:  # nothing started yet: nothing to clean up
        how = f" by {exc.args[0]}" if exc.args else ""
        sys.stderr.write(f"error: interrupted{how}; partial work was removed\n")
        sys.exit(signals.exit_code(exc))
    cli_main()


if __name__ == "__main__":
    main()
