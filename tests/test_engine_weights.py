"""Weight layout contract and clear errors for broken model directories."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from engine_models import build_model, hf_greedy, prompts

from gpu_runtime import Engine, ModelFileError, SamplingParams
from gpu_runtime.weights import load_weights, plan_weights
from modelinfo.config import ALIGN


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    return path, build_model(path, "qwen2", num_key_value_heads=1, tie_word_embeddings=True)


def test_layout_views_and_fused_groups(qwen2):
    path, hf = qwen2
    layout = plan_weights(path, torch.bfloat16)
    buffer = torch.empty(layout.total_bytes, dtype=torch.uint8)
    load_weights(layout, buffer)
    state = hf.state_dict()
    for slot in layout.slots:
        assert torch.equal(layout.view(buffer, slot.name), state[slot.name].bfloat16())
    a = "model.layers.1.self_attn."
    for suffix in ("weight", "bias"):
        names = [f"{a}{x}_proj.{suffix}" for x in "qkv"]
        fused = layout.fused(buffer, names)
        assert torch.equal(fused, torch.cat([state[n].bfloat16() for n in names]))
        assert fused.data_ptr() == buffer.data_ptr() + layout.slot(names[0]).offset  # a view, not a copy
        assert layout.slot(names[0]).offset % ALIGN == 0
    with pytest.raises(ValueError, match="not adjacent"):
        layout.fused(buffer, [a + "q_proj.weight", a + "o_proj.weight"])
    assert "lm_head.weight" not in {s.name for s in layout.slots}  # tied


def test_sharded_checkpoint(tmp_path, qwen2):
    _, hf = qwen2
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    layout = plan_weights(str(tmp_path), torch.float32)
    assert len({s.file for s in layout.slots}) > 1
    batch = prompts(128, [5, 12], seed=2)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = Engine.from_pretrained(str(tmp_path)).generate(batch, params)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in batch]


def broken_copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_config(tmp_path, qwen2):
    path = broken_copy(qwen2[0], tmp_path / "m")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ModelFileError, match=r"config\.json: file missing"):
        Engine.from_pretrained(path)


def test_unsupported_architecture(tmp_path, qwen2):
    path = broken_copy(qwen2[0], tmp_path / "m")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelFileError, match=r"config\.json: unsupported architecture.*GPT2LMHeadModel"):
        Engine.from_pretrained(path)


def test_no_safetensors(tmp_path, qwen2):
    path = broken_copy(qwen2[0], tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelFileError, match="no \\*.safetensors files"):
        Engine.from_pretrained(path)


def test_truncated_file(tmp_path, qwen2):
    path = broken_copy(qwen2[0], tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, os.path.getsize(file) - 100)
    with pytest.raises(ModelFileError, match=r"model\.safetensors: truncated file"):
        Engine.from_pretrained(path)
    os.truncate(file, 4)
    with pytest.raises(ModelFileError, match="truncated file"):
        Engine.from_pretrained(path)


def test_missing_tensor(tmp_path, qwen2):
    from safetensors.torch import load_file, save_file

    path = broken_copy(qwen2[0], tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ModelFileError, match="'model.layers.1.mlp.up_proj.weight' missing"):
        Engine.from_pretrained(path)


def test_shape_mismatch_names_tensor(tmp_path, qwen2):
    path = broken_copy(qwen2[0], tmp_path / "m")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] += 1
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelFileError, match="gate_proj.weight' has shape"):
        Engine.from_pretrained(path)
