"""Options shared by many commands, declared once so their help text never drifts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Output checkpoint folder (refused if it exists, unless --force).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Output dtype: bfloat16, float16 or float32 (default: the input's).")]
ShardSizeOpt = Annotated[str, typer.Option("--shard-size", help="Maximum shard size, e.g. 5GB, 500MB, 2GiB.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
PushOpt = Annotated[Optional[str], typer.Option("--push-to-hub", metavar="REPO_ID", help="After writing, upload the output to this Hub repository.")]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repository as private (with --push-to-hub).")]
def _device(value: str) -> str:
    """Refuse an unknown device, or one this machine lacks, when the flag is parsed."""
    from surgery.core.device import check_device

    return check_device(value)


DeviceOpt = Annotated[str, typer.Option("--device", callback=_device, help="Where the math runs: cpu, cuda, cuda:1, mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="Run the per-tensor work as Ray tasks, byte-identical to a plain run: on the cluster at ADDRESS "
         "(host:port, ray://host:port, auto), else $SURGERY_RAY_ADDRESS, else a new local Ray instance. "
         "Inputs and output must be on storage every node sees (docs/scale.md). Needs pip install 'surgery[ray]'.")]
ResumeRunOpt = Annotated[bool, typer.Option(
    "--resume-run", help="With --ray: continue the interrupted run of this same command (it resumes "
                         "automatically when one is found; this flag refuses to start without one).")]

DEFAULT_SHARD_SIZE = "5GB"
