"""surgery.checkpoint.model: transformers models built from the tensors the user named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.model import load_model, load_tokenizer
from surgery.core.errors import InputError

IDS = (torch.arange(12) * 37 % 500 + 3).unsqueeze(0)


def _out(model):
    with torch.no_grad():
        res = model(input_ids=IDS)
    return res.logits if getattr(res, "logits", None) is not None else res.last_hidden_state


@pytest.mark.parametrize("fixture,head,auto_cls", [
    ("llama-tiny/base", "causal_lm", "AutoModelForCausalLM"),
    ("gpt2-tiny/base", "causal_lm", "AutoModelForCausalLM"),
    ("llama-tiny/base", "base", "AutoModel"),
    ("bert-tiny/base", "auto", "AutoModel"),
])
@pytest.mark.slow
def test_same_outputs_as_from_pretrained(fixtures_dir, fixture, head, auto_cls):
    import transformers

    folder = fixtures_dir / fixture
    ours = load_model(open_checkpoint(folder), head=head)
    ref = getattr(transformers, auto_cls).from_pretrained(folder, dtype=torch.float32).eval()
    assert type(ours) is type(ref) and not ours.training
    assert torch.equal(_out(ours), _out(ref))


def test_builds_from_the_named_file_not_the_pickle_beside_it(fixtures_dir, tmp_path):
    """A folder holding the named .safetensors file and a pytorch_model.bin (no model.safetensors):
    from_pretrained(folder) would load the pickle; the loader must use the named tensors."""
    import transformers

    src = fixtures_dir / "llama-tiny"
    folder = tmp_path / "m"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / "base" / f, folder / f)
    named = load_file(str(src / "ft-a" / "model.safetensors"))
    save_file(named, str(folder / "edited.safetensors"))
    torch.save(load_file(str(src / "base" / "model.safetensors")), folder / "pytorch_model.bin")

    ours = load_model(open_checkpoint(folder / "edited.safetensors"))
    params = dict(ours.named_parameters())
    for name, t in named.items():
        assert torch.equal(params[name].detach(), t.float()), name
    # The test can fail: transformers on the folder scores the pickle (the base), not ft-a.
    pickled = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not torch.equal(_out(pickled), _out(ours))
    ft_a = transformers.AutoModelForCausalLM.from_pretrained(src / "ft-a", dtype=torch.float32).eval()
    assert torch.equal(_out(ft_a), _out(ours))


def test_dtype_and_device(fixtures_dir):
    ck = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    model = load_model(ck, dtype=torch.bfloat16)
    w = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w.detach(), ck.get("model.layers.0.mlp.up_proj.weight",
                                                                          dtype=torch.bfloat16))


def test_no_causal_head_and_missing_tensors(fixtures_dir, tmp_path):
    bert = open_checkpoint(fixtures_dir / "bert-tiny" / "base")
    with pytest.raises(InputError, match="is a BertModel, which has no causal-LM head"):
        load_model(bert, head="causal_lm")
    # Without `architectures`, the head's tensors are reported missing instead of randomly initialised.
    folder = tmp_path / "bert-noarch"
    shutil.copytree(fixtures_dir / "bert-tiny" / "base", folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="lacks .* tensor.* first 'cls.predictions") as err:
        load_model(open_checkpoint(folder), head="causal_lm")
    assert err.value.tensor.startswith("cls.predictions")
    # A dropped tensor of a causal LM is named.
    llama = tmp_path / "llama-missing"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", llama)
    sd = load_file(str(llama / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(llama / "model.safetensors"))
    with pytest.raises(InputError, match="'model.layers.1.mlp.down_proj.weight'"):
        load_model(open_checkpoint(llama))


def test_config_errors(fixtures_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "not-a-model"}))
    with pytest.raises(InputError, match="model_type 'not-a-model', which this transformers does not know"):
        load_model(open_checkpoint(folder))
    (folder / "config.json").unlink()
    with pytest.raises(InputError, match="has no config.json"):
        load_model(open_checkpoint(folder))
    with pytest.raises(InputError, match="no usable tokenizer"):
        load_tokenizer(open_checkpoint(folder), tmp_path / "nothing-here")


def test_transformers_logging_untouched_and_silent(fixtures_dir, capfd):
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    load_model(open_checkpoint(fixtures_dir / "bert-tiny" / "base"), head="auto")
    load_tokenizer(open_checkpoint(fixtures_dir / "llama-tiny" / "base"))
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
    captured = capfd.readouterr()
    assert captured.out == "" and "Loading weights" not in captured.err
