"""The `surgery` console script: the Typer app and the one place errors become exit codes.

Exit codes: 0 success, 1 a check or policy failed, 2 usage error, 3 input error,
130 interrupted, 70 an internal error (a defect: please report it). Expected errors print
one line on stderr; with ``--json`` stdout also gets one ``{"error": {...}}`` document.
``--debug`` (anywhere on the command line) or ``SURGERY_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any

import typer


def _kinds(name: str) -> tuple:
    """The exception classes main() sorts by (``exit``, ``abort``, ``usage``): typer's (typer
    >= 0.20 vendors its own click, whose exceptions are not click's) and click's own. Looked up
    when an exception arrives, not at import: click is imported only if something loaded it,
    and no click exception can be raised otherwise."""
    kinds: list = [KeyboardInterrupt] if name == "abort" else []
    try:
        from typer import exceptions as tx
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer uses click itself
        pass
    else:
        kinds += {"exit": [tx.Exit], "abort": [getattr(tx, "Abort", None)], "usage": [cx.ClickException]}[name]
    click = sys.modules.get("click")
    if click is not None:
        import click.exceptions

        kinds += {"exit": [click.exceptions.Exit], "abort": [click.exceptions.Abort],
                  "usage": [click.ClickException]}[name]
    return tuple(k for k in kinds if k is not None)


from surgery.core.errors import SurgeryError

from . import _render

# The registry of commands: each top-level command is the module of surgery.commands of the
# same name, whose register() adds it; in the order `surgery --help` lists them. A run builds
# only the command it invokes (one command module imported, not thirteen); --help, completion
# and anything that is not a command name build them all.
COMMANDS = ("inspect", "check", "diff", "convert", "pull", "push", "merge", "tune", "analyze", "eval", "edit", "grow",
            "fuse")


def _new_app() -> typer.Typer:
    app = typer.Typer(
        name="surgery",
        help="Weight-space surgery on safetensors checkpoints: merge, analyze, edit, grow, fuse, inspect and check.\n\n"
             "Add --debug anywhere to see tracebacks of expected errors. Shell completion: "
             "surgery --install-completion (bash, zsh, fish, PowerShell).",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        # Plain click help: text is printed as written ("[a, b]" is not eaten as markup) and
        # examples are never rewrapped, so each line pastes into a shell as printed.
        rich_markup_mode=None,
    )
    app.callback()(_root)
    return app


def build_app(names: Any = None) -> typer.Typer:
    """The Typer app with the commands ``names`` (default: all of :data:`COMMANDS`)."""
    import importlib

    app = _new_app()
    for name in COMMANDS if names is None else names:
        importlib.import_module(f"{__package__}.{name}").register(app)
    return app


def __getattr__(name: str) -> Any:
    """``app``: the whole Typer app, built on first use (tests walk it; main() builds only
    the command it runs). ``cli_entry``: :func:`main` as a click command (imports click)."""
    if name == "app":
        globals()["app"] = built = build_app()
        return built
    if name == "cli_entry":
        globals()["cli_entry"] = entry = _cli_entry()
        return entry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _command_for(argv: list[str]) -> Any:
    """The click command that runs ``argv``: only the invoked command when ``argv`` starts
    with a command name, none for ``--version``, else the whole app (root help, completion,
    unknown names)."""
    names = None
    if "_SURGERY_COMPLETE" not in os.environ and argv:
        if argv[0] in COMMANDS:
            names = [argv[0]]
        elif argv[0] == "--version":
            names = []
    command = typer.main.get_command(build_app(names))
    _plain_coercion(command)
    return command


class _PlainCoercion:
    """Coerces a ``str`` or ``bool`` parameter's value without pydantic where typer's own
    coercion would return it unchanged: a value of exactly that type, or a missing one.

    typer >= 0.2x coerces every parameter through a pydantic ``TypeAdapter`` built on first
    use, and importing pydantic is a third of `surgery inspect`'s start-up. Anything else
    (bytes, a list, another type) goes to typer's own coercion, built then."""

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if type(value) is self.kind or (value is None and not (param.multiple or param.nargs == -1)):
            return value
        param._runtime_param = None
        return param.get_runtime_param().coerce(value, param=param, ctx=ctx)


def _plain_coercion(command: Any) -> None:
    """Give every plain ``str``/``bool`` parameter of ``command``'s tree, its ``--help`` option
    included (made on first use), a :class:`_PlainCoercion`. A no-op on typer versions without
    runtime coercion objects."""
    for param in getattr(command, "params", []):
        _plain(param)
    get_help_option = getattr(command, "get_help_option", None)
    if get_help_option is not None:
        def help_option(ctx: Any) -> Any:
            option = get_help_option(ctx)
            if option is not None:
                _plain(option)
            return option

        command.get_help_option = help_option
    for sub in (getattr(command, "commands", None) or {}).values():
        _plain_coercion(sub)


def _plain(param: Any) -> None:
    desc = getattr(param, "type_descriptor", None)
    if desc is None or getattr(param, "_runtime_param", False) is not None:
        return
    if desc.annotation in (str, bool) and desc.file_annotation is None \
            and getattr(desc.parameter_info, "parser", None) is None:
        param._runtime_param = _PlainCoercion(desc.annotation)


INTERNAL_ERROR = 70


def _version_callback(value: bool) -> None:
    if value:
        from surgery import __version__

        sys.stdout.write(f"surgery {__version__}\n")
        raise typer.Exit(0)


def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Weight-space surgery on safetensors checkpoints."""


def _error_document(exc: BaseException, code: int) -> dict:
    err = {"code": code, "type": type(exc).__name__, "message": str(exc),
           "path": getattr(exc, "path", None), "tensor": getattr(exc, "tensor", None)}
    doc: dict = {"error": err, "passed": False}
    report = getattr(exc, "report", None)
    if report is not None:
        doc["report"] = report
    return doc


def _emit_error_json(exc: BaseException, code: int) -> None:
    from ._render import emit

    emit(_error_document(exc, code), lambda c: None, True)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SURGERY_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (also used as the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = expand_ray(a for a in argv if a != "--debug")
    as_json = "--json" in argv
    _render.set_quiet(False)
    command = _command_for(argv)
    try:
        rv = command.main(args=argv, prog_name="surgery", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except _kinds("exit") as exc:
        code = exc.exit_code
    except _kinds("usage") as exc:
        exc.show()
        code = exc.exit_code
        if as_json:
            _emit_error_json(exc, code)
    except _kinds("abort"):
        sys.stderr.write("interrupted; no output was written.\n")
        code = 130
    except SurgeryError as exc:
        if debug:
            traceback.print_exc()
        exc.message = flagify(_one_line(str(exc)), _invoked(command, argv))
        exc.args = (exc.message,)
        sys.stderr.write(f"error: {exc.message}\n")
        code = exc.exit_code
        if as_json:
            _emit_error_json(exc, code)
    except Exception as exc:  # a defect: one line, the traceback only on request
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"internal error, please report: {type(exc).__name__}: {_one_line(str(exc))} "
                         f"(run again with --debug for the traceback)\n")
        code = INTERNAL_ERROR
        if as_json:
            _emit_error_json(exc, code)
    sys.stdout.flush()
    return code


def expand_ray(argv: Any) -> list[str]:
    """``--ray [ADDRESS]`` takes its address only when the next word is one (``auto``,
    ``host:port``, ``ray://...``); a bare ``--ray`` becomes ``--ray=`` (the default address), so
    ``surgery convert --ray SRC OUT`` keeps SRC as the source."""
    argv = list(argv)
    if "--ray" not in argv:
        return argv
    from surgery.core.executor import looks_like_address

    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        if tok == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and looks_like_address(nxt):
                out.append(f"--ray={nxt}")
                i += 2
                continue
            out.append("--ray=")
        else:
            out.append(tok)
        i += 1
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


_PARAM_REF = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def _invoked(command: Any, argv: list[str]) -> Any:
    """The (sub)command ``argv`` runs."""
    for tok in argv:
        sub = getattr(command, "commands", None)
        if not sub:
            break
        if tok in sub:
            command = sub[tok]
    return command


def flagify(message: str, command: Any) -> str:
    """Library messages name parameters in backticks; on the command line they read as the
    invoked command's flags:

    - `` `density` `` becomes ``--density`` (an argument becomes its metavar, ``MODELS``);
    - `` `init='tile'` `` becomes ``--init tile``;
    - `` `verify=False` `` becomes ``--no-verify`` and `` `force=True` `` ``--force``.

    A merge-method parameter without a flag of its own (`` `epsilon` ``) becomes
    ``-p epsilon`` on the commands that take ``-p``; other names the command does not take lose
    their backticks."""
    params: dict[str, Any] = {}
    for p in getattr(command, "params", []):
        if p.name:
            params[p.name] = p
    for p in getattr(command, "params", []):
        for opt in getattr(p, "opts", []):  # `lambda` names --lambda although its Python name is lam
            if opt.startswith("--"):
                params.setdefault(opt[2:].replace("-", "_"), p)

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        param = params.get(name)
        if param is None:
            if "param" in params and name in _method_params():
                return f"-p {name}" if value is None else f"-p {name}={value.strip(chr(39) + chr(34))}"
            return name if value is None else f"{name}={value}"
        if getattr(param, "param_type_name", "") != "option":
            return param.metavar or param.name.upper()
        longs = [o for o in param.opts if o.startswith("--")] or list(param.opts)
        if value is None:
            return longs[0]
        if getattr(param, "is_flag", False):
            if value.strip().lower() in ("true", "1"):
                return longs[0]
            if param.secondary_opts:
                return param.secondary_opts[0]
            return f"no {longs[0]}"
        return f"{longs[0]} {value.strip().strip(chr(39) + chr(34))}"

    return _PARAM_REF.sub(flag, message)


def _method_params() -> set[str]:
    """Every parameter name some merge method declares (for `-p NAME` in messages)."""
    from surgery.merge.registry import METHODS

    return {p.name for m in METHODS.values() for p in m.params}


def _console_script() -> None:
    sys.exit(main())


def _cli_entry() -> Any:
    import click

    @click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                     "help_option_names": []})
    @click.pass_context
    def cli_entry(ctx: click.Context) -> None:
        """Wraps :func:`main` as a click command so tests can drive it with CliRunner."""
        ctx.exit(main(list(ctx.args)))

    return cli_entry


if __name__ == "__main__":
    _console_script()
