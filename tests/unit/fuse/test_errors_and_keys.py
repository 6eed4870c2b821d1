"""Key mapping whatever prefix the base uses, the refusals, and every error's message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_helpers import GPT2, FIXTURES, make_adapter
from surgery.fuse import fuse, parse_adapter_spec
from surgery.fuse.run import AdapterSpec
from surgery.core.errors import CheckpointNotFoundError, IncompatibleCheckpointsError, InputError, UsageError

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, llama_f32):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    return make_adapter(llama_f32, cfg, tmp_path_factory.mktemp("ad") / "lora", seed=4)


def _renamed_base(src, dst, rename):
    dst.mkdir()
    sd = load_file(src / "model.safetensors")
    save_file({rename(k): v for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize("rename,rule", [
    (lambda k: k.removeprefix("model."), "first name component dropped"),           # saved as LlamaModel
    (lambda k: "language_model." + k, "prefix 'language_model.' added"),            # wrapped in a bigger model
])
def test_key_mapping_any_prefix(tmp_path, llama_f32, lora_adapter, rename, rule):
    ref_report = fuse(llama_f32, [str(lora_adapter)], tmp_path / "ref").report
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    base = _renamed_base(llama_f32, tmp_path / "renamed", rename)
    report = fuse(base, [str(lora_adapter)], tmp_path / "out").report
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert report["adapters"][0]["key_mapping"] == rule
    assert report["tensors_changed"] == sorted(rename(k) for k in ref_report["tensors_changed"])
    for k, v in ref.items():
        assert torch.equal(got[rename(k)], v), k


def test_untouched_tensors_are_byte_copies(tmp_path, llama_f32, lora_adapter):
    from surgery.checkpoint import open_checkpoint

    threads = torch.get_num_threads()
    report = fuse(llama_f32, [str(lora_adapter)], tmp_path / "out").report
    assert torch.get_num_threads() == threads          # small tensors ran on one thread, then restored
    base, out = open_checkpoint(str(llama_f32)), open_checkpoint(str(tmp_path / "out"))
    untouched = [n for n in base.names if n not in report["tensors_changed"]]
    assert len(untouched) == report["tensors_copied"] == len(base.names) - 4
    for n in untouched:
        assert base.tensor_sha256(n) == out.tensor_sha256(n)


def test_dtype_option_and_config(tmp_path, llama_f32, lora_adapter):
    fuse(llama_f32, [str(lora_adapter)], tmp_path / "out", dtype="bfloat16")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda"])
def test_base_changing_initialisations_refused(tmp_path, lora_adapter, llama_f32, init):
    ad = shutil.copytree(lora_adapter, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=rf"init_lora_weights='{init}', which replaced the base weights W by a "
                                         r"residual before training.*path_initial_model_for_weight_conversion") as e:
        fuse(llama_f32, [str(ad)], tmp_path / "out")
    assert e.value.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_converted_pissa_accepted(tmp_path, lora_adapter, llama_f32):
    """PEFT saves a converted PiSSA adapter with init_lora_weights=True: it fuses like LoRA."""
    ad = shutil.copytree(lora_adapter, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = True
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    report = fuse(llama_f32, [str(ad)], tmp_path / "out").report
    assert len(report["tensors_changed"]) == 4


def test_unknown_kind(tmp_path, lora_adapter, llama_f32):
    ad = shutil.copytree(lora_adapter, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["peft_type"] = "BOFT"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"peft_type 'BOFT', which surgery fuse does not know; known kinds: "
                                         r"CURRICULUM_LORA, HIRA, HUT, IA3, LOHA, LOKR, LORA, TERA, VERA\."):
        fuse(llama_f32, [str(ad)], tmp_path / "out")


def test_adapter_for_another_model(tmp_path, llama_f32):
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    ad = make_adapter(GPT2, cfg, tmp_path / "gpt2-lora")
    with pytest.raises(IncompatibleCheckpointsError, match=r"changes 'transformer.h.0.attn.c_attn'.*has no tensor "
                                                           r"'transformer.h.0.attn.c_attn.weight'; is the adapter for "
                                                           r"another model\?") as e:
        fuse(llama_f32, [str(ad)], tmp_path / "out")
    assert e.value.exit_code == 3


def test_shape_mismatch_reported_before_any_tensor_is_read(tmp_path, lora_adapter, monkeypatch):
    from surgery.checkpoint.reader import Checkpoint

    wide = FIXTURES / "llama-wide" / "base"
    if not (wide / "model.safetensors").exists():
        pytest.skip("no llama-wide fixture")

    def no_reads(self, name):
        raise AssertionError(f"read {name} before validating")

    monkeypatch.setattr(Checkpoint, "get_raw", no_reads)
    with pytest.raises(IncompatibleCheckpointsError, match=r"produces an update of shape \[\d+, \d+\] but the base "
                                                           r"tensor is .*trained on a different model \(and 3 more "
                                                           r"problem\(s\): .*"):
        fuse(wide, [str(lora_adapter)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files(tmp_path, llama_f32):
    with pytest.raises(CheckpointNotFoundError, match="adapter folder .*nope does not exist"):
        fuse(llama_f32, [str(tmp_path / "nope")], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no adapter_config.json; surgery fuse reads adapter folders"):
        fuse(llama_f32, [str(tmp_path / "empty")], tmp_path / "out")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text("{}")
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="adapter_model.bin, a pickle surgery never opens implicitly; convert it"):
        fuse(llama_f32, [str(tmp_path / "pickled")], tmp_path / "out")
    with pytest.raises(UsageError, match="give at least one adapter"):
        fuse(llama_f32, [], tmp_path / "out")


def test_adapter_spec_parsing():
    assert parse_adapter_spec("a/b:0.25") == AdapterSpec("a/b", 0.25)
    assert parse_adapter_spec("a/b:-1") == AdapterSpec("a/b", -1.0)
    assert parse_adapter_spec("a/b") == AdapterSpec("a/b", 1.0)
    assert parse_adapter_spec("dir:name") == AdapterSpec("dir:name", 1.0)
    with pytest.raises(UsageError, match="adapter weight in 'a:nan' must be a finite number"):
        parse_adapter_spec("a:nan")
