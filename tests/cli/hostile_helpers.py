"""Small hand-made inputs for the hostile-input tests: checkpoints, LoRA adapters and edit
files written with plain safetensors (no PEFT, no models), in a few milliseconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "llama-tiny"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def copy_model(src: Path, dst: Path, change=None) -> Path:
    """Copy a fixture folder; ``change(tensors)`` may edit the float32 tensors first."""
    shutil.copytree(src, dst)
    if change is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(dst / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def lora_adapter(folder: Path, *, r: int = 2, config: dict | None = None, a=None, b=None,
                 module: str = Q_PROJ, dims: tuple[int, int] = (64, 64), extra: dict | None = None) -> Path:
    """A PEFT-format LoRA adapter on one module of llama-tiny (``dims`` = [out, in])."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    out_f, in_f = dims
    a = a if a is not None else 0.1 * torch.randn(r, in_f, generator=g)
    b = b if b is not None else 0.1 * torch.randn(out_f, r, generator=g)
    tensors = {f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b}
    tensors.update(extra or {})
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [module.rsplit(".", 1)[1]],
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "bias": "none",
           "base_model_name_or_path": str(LLAMA / "base")}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def raw_config(folder: Path, text: str | bytes) -> None:
    p = folder / "adapter_config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())


def one_line_error(res, code: int | tuple[int, ...]) -> str:
    """Assert the CLI result is an expected error: the exit code, one stderr line, no traceback."""
    codes = code if isinstance(code, tuple) else (code,)
    assert res.code in codes, (res.code, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    return lines[0]
