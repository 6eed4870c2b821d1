"""The record of an operation: model card README.md and the safetensors ``__metadata__``."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__


def make_record(operation: str, parameters: dict[str, Any], inputs: list[dict[str, Any]],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of one operation (deterministic: no timestamps, sorted keys when dumped)."""
    record = {"tool": "surgery", "version": __version__, "operation": operation,
              "parameters": parameters, "inputs": inputs}
    if extra:
        record["results"] = extra
    return record


def render_card(record: dict[str, Any], base_model: str | None = None) -> str:
    """A Hugging Face model card (YAML front matter + Markdown) describing ``record``."""
    tags = ["surgery", record["operation"]]
    front = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = front + [
        "",
        f"# {record['operation']} output",
        "",
        f"Made with `surgery {record['operation']}` (surgery {record['version']}).",
        "",
        "## Inputs",
        "",
        "| role | checkpoint | sha256 |",
        "| --- | --- | --- |",
    ]
    for inp in record["inputs"]:
        lines.append(f"| {inp.get('role', 'input')} | `{inp['label']}` | `{inp.get('sha256', '')}` |")
    lines += ["", "## Parameters", "", "```json", json.dumps(record["parameters"], indent=2, sort_keys=True, default=str), "```"]
    if record.get("results"):
        lines += ["", "## Results", "", "```json", json.dumps(record["results"], indent=2, sort_keys=True, default=str), "```"]
    lines += ["", "The same record is stored as JSON under the `surgery` key of every shard's safetensors `__metadata__`.", ""]
    return "\n".join(lines)
