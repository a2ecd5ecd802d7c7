"""The benchmark and evaluation tools people already use, unmodified, against a real stack (Redis, gateway, worker).

lm-eval (`local-completions`) runs a local multiple-choice task, whose log-likelihoods must equal transformers' on the
same weights, and a `generate_until` task in batches of 4 prompts; guidellm runs with its default backend settings
(it probes GET /health); aiperf runs from its own venv (see the Makefile). Each is a small run with synthetic or
local data and a local tokenizer: nothing is downloaded. Results are read from each tool's result files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, Stack

FN = "tp-tiny"
BIN = Path(sys.executable).parent  # lm_eval and guidellm are console scripts of this venv (the [dev] extra)
AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"  # aiperf's own venv, made by `make test` (the Makefile says why)
REQUESTS = 24  # per benchmark tool: enough to run several at once, small enough for a 2-core CI
MC_DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green as grass", "red"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "twenty two"], "answer": 0},
    {"question": "Cats like to drink", "choices": ["milk", "motor oil", "cold tea with lemon"], "answer": 0},
    {"question": "Hello,  ", "choices": ["world", "there"], "answer": 1},  # trailing spaces move to the choice
]
GEN_DOCS = [{"prompt": f"Item {i}: the quick brown fox", "target": "jumps"} for i in range(8)]


def run_tool(args: list[str | Path], env: dict[str, str], cwd: Path, timeout_s: float) -> None:
    """Run one tool to completion; its output is shown only when it fails."""
    proc = subprocess.run(
        [str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def tool_env(tmp_path: Path, offline: bool = True) -> dict[str, str]:
    """A private Hugging Face home (nothing read from earlier runs or left behind) and, where the tool honours them,
    the documented offline switches, so a missing local file fails instead of reaching for a hub."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env


@pytest.fixture(scope="module")
def served(stack: Stack, tiny_model: Path) -> Stack:
    spec = f"name: {FN}\nmodel: {tiny_model}\nengine: builtin\ndtype: float32\nmax_model_len: 256\n"
    resp = httpx.post(f"{stack.url}/functions", content=spec, headers={"content-type": "application/yaml"})
    assert resp.status_code == 201, resp.text
    return stack


# ---- lm-eval ----
def write_tasks(folder: Path) -> Path:
    """Two lm-eval tasks over local JSON files (the `json` dataset builder ships with `datasets`)."""
    tasks = folder / "tasks"
    tasks.mkdir()
    (folder / "mc.json").write_text(json.dumps(MC_DOCS))
    (folder / "gen.json").write_text(json.dumps(GEN_DOCS))
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {folder}/{{data}}\n"
    (tasks / "ws_mc.yaml").write_text(
        "task: ws_mc\n" + common.format(data="mc.json") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n"
    )
    (tasks / "ws_gen.yaml").write_text(
        "task: ws_gen\n" + common.format(data="gen.json") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: target\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


@pytest.fixture(scope="module")
def lm_eval_samples(served: Stack, tiny_model: Path, tmp_path_factory) -> dict[str, list[dict]]:
    """One lm-eval run of both tasks, 4 requests a batch (a list of prompts in one request); its logged samples."""
    work = tmp_path_factory.mktemp("lm-eval")
    model_args = (
        f"model={FN},base_url={served.url}/v1/completions,tokenizer={tiny_model},tokenizer_backend=huggingface,"
        "max_retries=1"  # an error answer fails the run at once instead of after lm-eval's back-off
    )
    run_tool(
        [BIN / "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "ws_mc,ws_gen", "--include_path", write_tasks(work), "--batch_size", "4",
         "--output_path", work / "out", "--log_samples"],
        tool_env(work), work, timeout_s=240,
    )  # fmt: skip
    return {task: read_samples(work / "out", task) for task in ("ws_mc", "ws_gen")}


def read_samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@torch.no_grad()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """What lm-eval asks for, computed by transformers: the continuation's summed log-probability after the context.

    The split is lm-eval's own (`_encode_pair`): trailing spaces of the context move to the continuation, the pair
    is encoded whole, and the context's own encoding is cut off its front."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    start = len(tokenizer(context, add_special_tokens=False).input_ids)
    logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


@pytest.mark.timeout(300)
def test_lm_eval_loglikelihoods_equal_transformers(lm_eval_samples, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    samples = lm_eval_samples["ws_mc"]
    assert [s["doc_id"] for s in samples] == list(range(len(MC_DOCS)))
    for sample in samples:
        assert len(sample["filtered_resps"]) == len(sample["doc"]["choices"])
        for args, resp in zip(sample["arguments"].values(), sample["filtered_resps"], strict=True):
            served_ll = float(resp[0])  # lm-eval logs (loglikelihood, is_greedy) as strings
            expected = reference_loglikelihood(model, tokenizer, args["arg_0"], args["arg_1"])
            assert served_ll == pytest.approx(expected, abs=1e-4), (args, served_ll, expected)


@pytest.mark.timeout(300)
def test_lm_eval_generate_until_in_batches_of_4(lm_eval_samples, served, tiny_model):
    """Every prompt of a batch is answered, and exactly as it is alone: greedy, same tokens, same stop strings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    samples = lm_eval_samples["ws_gen"]
    assert [s["doc_id"] for s in samples] == list(range(len(GEN_DOCS)))
    for sample in samples:
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        alone = httpx.post(
            f"{served.url}/v1/completions",
            json={
                "model": FN,
                "prompt": tokenizer(context, add_special_tokens=False).input_ids,  # lm-eval sends token ids
                "max_tokens": 8,
                "temperature": 0,
                "stop": ["\n", tokenizer.eos_token],  # lm-eval adds the eos text to `until`
            },
            timeout=60,
        )
        assert alone.status_code == 200, alone.text
        assert sample["resps"][0][0] == alone.json()["choices"][0]["text"], context


# ---- guidellm ----
def test_the_chat_request_guidellm_sends_by_default_is_served(served):
    """guidellm 0.8's default chat body, field for field (backends/openai/request_handlers.py): content as text
    parts, vLLM's `continuous_usage_stats` and `ignore_eos`, `stop: null`. A refusal shows here with the gateway's
    own message, where the guidellm run below only counts errored requests."""
    body = {
        "model": FN,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_completion_tokens": 8,
        "stop": None,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as resp:
        text = resp.read().decode()
    assert resp.status_code == 200, text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.timeout(240)
def test_guidellm_with_default_backend_settings_has_no_errors(served, tiny_model, tmp_path):
    """Only the target is given: guidellm validates the backend (GET /health), picks the model from /v1/models and
    streams chat completions, as it does by default."""
    out = tmp_path / "guidellm.json"
    run_tool(
        [BIN / "guidellm", "run", "--backend", f"kind=openai_http,target={served.url}",
         "--profile", "kind=concurrent,streams=4", "--constraint", f"kind=max_requests,count={REQUESTS}",
         "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
         "--tokenizer", f"kind=huggingface_auto,model={tiny_model}",
         "--output", f"kind=json,path={out}", "--disable-console-interactive"],
        tool_env(tmp_path), tmp_path, timeout_s=200,
    )  # fmt: skip
    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    first_error = (benchmark["requests"]["errored"] or [None])[0]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, json.dumps(first_error)


# ---- aiperf ----
@pytest.mark.timeout(240)
def test_aiperf_run_has_no_errors(served, tiny_model, tmp_path):
    if not AIPERF.is_file():
        pytest.fail(f"{AIPERF} is missing: `make test` creates aiperf's venv")
    artifacts = tmp_path / "aiperf"
    run_tool(
        [AIPERF, "profile", "--model", FN, "--url", served.url, "--endpoint-type", "chat", "--streaming",
         "--tokenizer", tiny_model, "--request-count", REQUESTS, "--concurrency", 4,
         "--synthetic-input-tokens-mean", 32, "--output-tokens-mean", 8, "--artifact-dir", artifacts,
         "--ui-type", "none", "--no-gpu-telemetry", "--no-server-metrics", "--workers-max", 2,
         "--record-processor-service-count", 1,
         # Seeded prompts, greedy and no early eos: the random tiny model's answers are then the same every run
         # (sampled ones were sometimes only partial-UTF-8 byte tokens, no text, which aiperf counts as an error).
         "--random-seed", 0, "--extra-inputs", '{"temperature": 0, "ignore_eos": true}'],
        # Not offline: aiperf 0.13.0 with HF_HUB_OFFLINE looks every tokenizer name up as a cached hub repo id and
        # refuses a local directory; a directory is loaded from disk by transformers without any hub call anyway.
        tool_env(tmp_path, offline=False), tmp_path, timeout_s=200,
    )  # fmt: skip
    result = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    assert result["is_complete"] and not result["was_cancelled"]
    assert result["error_summary"] == [], result["error_summary"]
    assert result["completed_request_count"]["avg"] == REQUESTS
    assert result["request_error_rate"]["avg"] == 0
