"""Coverage-guided fuzzing of every reader a user's bytes reach (atheris / libFuzzer).

The first input byte picks the reader; the rest is the file:

  0  safetensors file: header validation, opening, reading every tensor
  1  config.json / index / state / manifest JSON (core.formats.parse_json)
  2  YAML (recipes, GPT-NeoX configs: core.formats.parse_yaml)
  3  adapter_config.json (checkpoint.peft: the shared PEFT parser, LoRA grouping)
  4  edit file (edit.format.load_edit through the validated reader)
  5  sha256 manifest (check.read_manifest)

The contract: a reader returns a valid result or raises surgery's InputError (one line).
Anything else (RecursionError, UnicodeError, KeyError, a hang) is a finding and crashes the
fuzzer with the input saved as crash-*.

Run (atheris is not a project dependency: pip install atheris):

    python fuzz/fuzz_readers.py fuzz/corpus -max_total_time=600 -rss_limit_mb=4096 -timeout=20

New interesting inputs are added to fuzz/corpus (kept in the repository); reproduce a crash
with ``python fuzz/fuzz_readers.py crash-<sha>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["surgery"]):
    from surgery.check import read_manifest
    from surgery.checkpoint.peft import LoraConfig, lora_modules, validate_adapter_config
    from surgery.checkpoint.reader import open_local
    from surgery.core.errors import InputError
    from surgery.core.formats import parse_json, parse_yaml
    from surgery.edit.format import load_edit

WORK = Path(tempfile.mkdtemp(prefix="surgery-fuzz-"))
ADAPTER_WEIGHTS = WORK / "adapter_model.safetensors"


def _file(name: str, data: bytes) -> Path:
    p = WORK / name
    p.write_bytes(data)
    return p


def _adapter_weights() -> None:
    import torch
    from safetensors.torch import save_file

    m = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({m + ".lora_A.weight": torch.ones(2, 4), m + ".lora_B.weight": torch.ones(4, 2)}, str(ADAPTER_WEIGHTS))


def one_input(data: bytes) -> None:
    if not data:
        return
    target, body = data[0] % 6, data[1:]
    try:
        if target == 0:
            ck = open_local(_file("x.safetensors", body))
            for name in ck.names:
                ck.get_raw(name)
            ck.config
        elif target == 1:
            parse_json(body, path="fuzz.json", what="JSON file", expect=None)
        elif target == 2:
            text = body.decode("utf-8", errors="strict")
            parse_yaml(text, path="fuzz.yml", expect=None)
        elif target == 3:
            cfg = parse_json(body, path="adapter_config.json", what="adapter config", expect=dict)
            validate_adapter_config(cfg, Path("adapter_config.json"))
            lcfg = LoraConfig.from_config(cfg, WORK)
            lora_modules(lcfg, open_local(ADAPTER_WEIGHTS))
        elif target == 4:
            load_edit(_file("e.safetensors", body))
        else:
            read_manifest(_file("SHA256SUMS", body))
    except InputError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"a multi-line error: {exc!r}") from exc
    except UnicodeDecodeError:
        if target != 2:  # only the harness's own decode of YAML bodies may fail this way
            raise


def main() -> None:
    _adapter_weights()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("SURGERY_NO_HASH_CACHE", "1")
    main()
