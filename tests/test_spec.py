"""Function specs: valid files load, every kind of bad file is rejected with file, field and reason."""

from __future__ import annotations

import orjson
import pytest

from functions.spec import FunctionSpec, SpecError, examples_dir, load_file, parse_yaml

GOOD = """
name: demo
model: {model}
engine: builtin
dtype: float32
max_model_len: 256
scaling: {{min_instances: 0, max_instances: 2, keep_alive_s: 30}}
slo: {{ttft_ms: 200}}
"""


def test_examples_are_valid(tiny_model):
    specs = [load_file(p) for p in sorted(examples_dir().glob("*.yaml"))]
    assert {s.engine for s in specs} == {"builtin", "transformers"}
    assert all(s.model == str(tiny_model) for s in specs)


def test_round_trip_json(tiny_model):
    spec = parse_yaml(GOOD.format(model=tiny_model))
    assert FunctionSpec.from_json(spec.to_json()) == spec
    assert spec.scaling.max_instances == 2 and spec.slo.ttft_ms == 200


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("name: [unclosed", "<yaml>", "invalid YAML at line 1"),
        ("- a list", "<document>", "must be a mapping"),
        ("model: x", "name", "is required"),
        ("name: Bad Name\nmodel: {model}", "name", "must match"),
        ("name: a\nmodel: /nonexistent/dir", "model", "does not exist"),
        ("name: a\nmodel: {model}\nengine: vllm", "engine", "must be one of"),
        ("name: a\nmodel: {model}\ndtype: int4", "dtype", "must be one of"),
        ("name: a\nmodel: {model}\nmax_model_len: '2k'", "max_model_len", "must be an integer"),
        ("name: a\nmodel: {model}\nmax_model_len: 0", "max_model_len", "must be >= 16"),
        ("name: a\nmodel: {model}\nscaling: {{max_instances: 0}}", "scaling.max_instances", "must be >= 1"),
        ("name: a\nmodel: {model}\nscaling: {{min_instances: 3}}", "scaling.min_instances", "must not exceed"),
        ("name: a\nmodel: {model}\nscaling: {{keepalive: 3}}", "scaling.keepalive", "unknown field"),
        ("name: a\nmodel: {model}\nslo: {{ttft_ms: fast}}", "slo.ttft_ms", "must be a finite number"),
        ("name: a\nmodel: {model}\nslo: {{ttft_ms: .inf}}", "slo.ttft_ms", "must be a finite number"),
        ("name: a\nmodel: {model}\nscaling: {{keep_alive_s: .nan}}", "scaling.keep_alive_s", "must be a finite"),
        ("name: a\nmodel: {model}\nmax_model_len: 4096", "max_model_len", "exceeds the model's max_position"),
        ("name: a\nmodel: {model}\ngpus: 2", "gpus", "unknown field"),
    ],
)
def test_bad_specs_name_field_and_reason(tiny_model, text, field, reason):
    with pytest.raises(SpecError) as err:
        parse_yaml(text.format(model=tiny_model), source="f.yaml")
    assert err.value.field == field
    assert reason in err.value.reason
    assert str(err.value).startswith("f.yaml: field")


def test_max_model_len_defaults_to_the_model_limit(tiny_model):
    assert parse_yaml(f"name: a\nmodel: {tiny_model}").max_model_len == 1024  # the tiny model's limit


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpecError, match="no \\*.safetensors"):
        parse_yaml(f"name: a\nmodel: {tmp_path}")


def test_relative_model_path_is_relative_to_the_file(tmp_path, tiny_model):
    (tmp_path / "m").symlink_to(tiny_model)
    (tmp_path / "f.yaml").write_text("name: rel\nmodel: m\n")
    assert load_file(tmp_path / "f.yaml").model == str(tiny_model.resolve())


def test_unreadable_file_names_the_file(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml: field '<file>': cannot read"):
        load_file(tmp_path / "missing.yaml")


def copy_with_config(src, dst, **changes):
    """A copy of a model directory whose config.json has `changes` (None deletes a field)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


def test_a_sliding_window_caps_max_model_len(tiny_model, tmp_path):
    model = copy_with_config(tiny_model, tmp_path / "m", sliding_window=256, use_sliding_window=True)
    assert parse_yaml(f"name: a\nmodel: {model}").max_model_len == 256
    with pytest.raises(SpecError, match="exceeds"):
        parse_yaml(f"name: a\nmodel: {model}\nmax_model_len: 512")


def test_an_architecture_only_transformers_runs_is_refused_for_builtin(tiny_model, tmp_path):
    model = copy_with_config(tiny_model, tmp_path / "m", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(SpecError, match="unsupported architecture") as err:
        parse_yaml(f"name: a\nmodel: {model}")
    assert err.value.field == "model"
    assert parse_yaml(f"name: a\nmodel: {model}\nengine: transformers").max_model_len == 1024


def test_footprint_is_what_the_memory_pool_reserves(tiny_model, tmp_path):
    """The warmer sizes a function exactly as a worker's pool will: in the serving dtype, not the file's."""
    import torch

    from functions.spec import footprint
    from gpu_runtime.memory import ModelHost
    from gpu_runtime.weights import plan_weights
    from warmserve.tinymodel import build_tiny_llama

    bf16 = build_tiny_llama(tmp_path / "bf16", torch_dtype="bfloat16")
    for dtype, factor in (("float32", 4), ("bfloat16", 2)):
        spec = parse_yaml(f"name: a\nmodel: {bf16}\ndtype: {dtype}\nmax_model_len: 128")
        size = footprint(spec, kv_seqs=8)
        assert size.weight_bytes == plan_weights(str(bf16), getattr(torch, dtype)).total_bytes
        host = ModelHost("cpu", gpu_bytes=1 << 30, chunk_bytes=1 << 20)
        host.register("a", spec.model, dtype, size.kv_bytes)
        assert host.report()["models"]["a"]["weight_bytes"] == size.weight_bytes
        # K and V, 2 layers, 2 KV heads of 16, 128 tokens, 8 sequences
        assert size.kv_bytes == 2 * 2 * 2 * 16 * factor * 128 * 8


SEVERAL = """
name: Bad Name
model: {model}
engine: vllm
dtype: int4
max_model_len: 0
gpus: 2
scaling: {{max_instances: 0, keepalive: 3}}
slo: {{ttft_ms: fast}}
"""
SEVERAL_FIELDS = [
    "gpus", "name", "engine", "dtype", "max_model_len", "scaling.keepalive", "scaling.max_instances", "slo.ttft_ms"
]  # fmt: skip


def test_a_spec_with_several_mistakes_reports_all_of_them(tiny_model):
    with pytest.raises(SpecError) as err:
        parse_yaml(SEVERAL.format(model=tiny_model), source="f.yaml")
    assert [f for f, _ in err.value.problems] == SEVERAL_FIELDS
    assert (err.value.field, err.value.reason) == err.value.problems[0]
    assert str(err.value).startswith("f.yaml: field 'gpus': unknown field")
    assert all(f"field '{f}'" in str(err.value) for f in SEVERAL_FIELDS)


def test_a_missing_model_is_one_problem_not_several(tmp_path):
    """Checks that need the model's files are skipped when it can't be read, instead of failing in turn."""
    with pytest.raises(SpecError) as err:
        parse_yaml(f"name: a\nmodel: {tmp_path / 'nope'}\nscaling: {{max_queue: 0}}")
    assert [f for f, _ in err.value.problems] == ["model", "scaling.max_queue"]


def test_an_error_lists_a_bounded_number_of_problems(tiny_model):
    text = f"name: a\nmodel: {tiny_model}\n" + "".join(f"k{i}: 1\n" for i in range(200))
    with pytest.raises(SpecError) as err:
        parse_yaml(text)
    assert len(err.value.problems) == 200
    assert str(err.value).endswith("; and 190 more problems") and len(str(err.value)) < 2000


def test_the_gateway_400_names_every_field(redis_url, tiny_model):
    from gateway_inproc import FAST, AppClient, db_url

    from gateway.app import create_app

    client = AppClient(create_app(db_url(redis_url, 13), FAST))
    try:
        resp = client.request(
            "POST", "/functions", content=SEVERAL.format(model=tiny_model), headers={"content-type": "text/yaml"}
        )
    finally:
        client.close()
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "gpus"
    assert all(f"field '{f}'" in error["message"] for f in SEVERAL_FIELDS), error["message"]


def test_a_stored_entry_without_max_model_len_is_refused(tiny_model):
    stored = orjson.dumps({"name": "a", "model": str(tiny_model)})  # not a spec we wrote: to_json has every field
    with pytest.raises(SpecError) as err:
        FunctionSpec.from_json(stored)
    assert err.value.problems == [("max_model_len", "must be an integer, got None")]
