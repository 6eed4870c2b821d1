"""Options shared by many commands, declared once so their help text never drifts.

Choices are enums: ``--help`` lists them and the parser refuses anything else (exit 2)
before the library runs. Commands hand the library ``choice(x)``, the plain string.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional

import typer


class Choice(str, Enum):
    """A choice that prints, formats and compares as its plain string value."""

    def __str__(self) -> str:
        return self.value


class Dtype(Choice):
    """Output dtypes of every writing command (the short names are aliases)."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class ComputeDtype(Choice):
    """dtypes of forward passes and stored factors."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def choice(value: Any) -> Any:
    """The plain string behind an enum choice (``None`` stays ``None``)."""
    return value.value if isinstance(value, Enum) else value


def _set_quiet(value: bool) -> bool:
    from . import _render

    _render.set_quiet(value)
    return value


OutputOpt = Annotated[Path, typer.Option("-o", "--output", metavar="DIR", help="Output checkpoint folder (refused if it exists, unless --force).")]
DtypeOpt = Annotated[Optional[Dtype], typer.Option("--dtype", case_sensitive=False, help="Output dtype (default: the input's).")]
ShardSizeOpt = Annotated[str, typer.Option("--shard-size", metavar="SIZE", help="Maximum shard size, e.g. 5GB, 500MB, 2GiB.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
PushOpt = Annotated[Optional[str], typer.Option("--push-to-hub", metavar="REPO_ID", help="After writing, upload the output to this Hub repository.")]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repository as private (with --push-to-hub).")]
def _device(value: str) -> str:
    """Refuse an unknown device, or one this machine lacks, when the flag is parsed."""
    from surgery.core.device import check_device

    return check_device(value)


DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", callback=_device, help="Where the math runs: cpu, cuda, cuda:1, mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", callback=_set_quiet,
                                        help="No progress bars or progress messages on stderr (errors still print).")]
TextOpt = Annotated[Optional[Path], typer.Option("--text", metavar="FILE", help="UTF-8 text file, one sentence per line (default: the built-in 70-sentence probe).")]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", metavar="TOKENIZER", help="Tokenizer folder or Hub id when the checkpoint has none.")]
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="Run the per-tensor work as Ray tasks, byte-identical to a plain run: on the cluster at ADDRESS "
         "(host:port, ray://host:port, auto), else $SURGERY_RAY_ADDRESS, else a new local Ray instance. "
         "Inputs and output must be on storage every node sees (docs/scale.md). Needs pip install 'surgery[ray]'.")]
ResumeRunOpt = Annotated[bool, typer.Option(
    "--resume-run", help="With --ray: continue the interrupted run of this same command (it resumes "
                         "automatically when one is found; this flag refuses to start without one).")]

DEFAULT_SHARD_SIZE = "5GB"


def base_help(what: str) -> str:
    """One wording for ``--base`` everywhere: the pretrained checkpoint the others are changes of."""
    return f"Base (pretrained) checkpoint the others are changes of; {what}"


def deprecated_alias(old: str, new: str) -> None:
    """Warn on stderr (even with -q) that a hidden old spelling was used; it still works."""
    from . import _render

    _render.stderr_console().print(f"note: {old} is deprecated; use {new}.", highlight=False)


def add_examples(fn: Callable[..., Any], examples: Iterable[str]) -> Callable[..., Any]:
    """Append an ``Examples:`` section to a command's help, one example per line, never rewrapped
    (click's ``\\b`` marker), so every line can be copied into a shell as printed."""
    lines = [f"  {e}" for e in examples]
    if lines:
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\nExamples:\n\n\b\n" + "\n".join(lines)
    return fn
