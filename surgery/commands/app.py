"""The `surgery` console script: the Typer app and the one place errors become exit codes.

Exit codes: 0 success, 1 a check or policy failed, 2 usage error, 3 input error,
130 interrupted. Expected errors print one line on stderr; ``--debug`` (anywhere on the
command line) or ``SURGERY_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer

try:  # typer >= 0.20 vendors its own click; its exceptions are not click's
    from typer import exceptions as _tx
    from typer._click import exceptions as _cx

    _EXIT = (_tx.Exit, click.exceptions.Exit)
    _ABORT = (getattr(_tx, "Abort", click.exceptions.Abort), click.exceptions.Abort, KeyboardInterrupt)
    _CLICK_ERR = (_cx.ClickException, click.ClickException)
except ImportError:  # pragma: no cover - older typer uses click itself
    _EXIT = (click.exceptions.Exit,)
    _ABORT = (click.exceptions.Abort, KeyboardInterrupt)
    _CLICK_ERR = (click.ClickException,)

from surgery.core.errors import SurgeryError

from . import analyze, check, convert, diff, edit, eval, fuse, grow, inspect, merge, push

app = typer.Typer(
    name="surgery",
    help="Weight-space surgery on safetensors checkpoints: merge, analyze, edit, grow, fuse, inspect and check.\n\n"
         "Add --debug anywhere to see tracebacks of expected errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# One line per command group: the registry of commands.
for _module in (inspect, check, diff, convert, push, merge, analyze, eval, edit, grow, fuse):
    _module.register(app)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SURGERY_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (also used as the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="surgery", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except _EXIT as exc:
        code = exc.exit_code
    except _CLICK_ERR as exc:
        exc.show()
        code = exc.exit_code
    except _ABORT:
        sys.stderr.write("interrupted; no output was written.\n")
        code = 130
    except SurgeryError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        if not debug:
            sys.stderr.write("(run again with --debug for the traceback)\n" if exc.exit_code != 1 else "")
        code = exc.exit_code
    sys.stdout.flush()
    return code


def _console_script() -> None:
    sys.exit(main())


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def cli_entry(ctx: click.Context) -> None:
    """Wraps :func:`main` as a click command so tests can drive it with CliRunner."""
    ctx.exit(main(list(ctx.args)))


if __name__ == "__main__":
    _console_script()
