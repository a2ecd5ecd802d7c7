"""Tiny random-weight models whose chat templates render tools, in the Llama 3.1 and the Hermes/Qwen2.5 styles.

The templates are written here for the tests (not copied from any model repository): they carry what WarmServe
relies on, the `tools` variable rendered into the prompt and the marker that names the call format
(<|python_tag|> for Llama 3.1, <tool_call> for Hermes), plus past calls and tool results.
"""

from __future__ import annotations

import json
from pathlib import Path

from warmserve.tinymodel import build_tiny_llama

_TURNS = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>CALLS<|end|>"
    "{%- elif m.role == 'tool' %}<|user|>RESULT<|end|>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}<|end|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    '{%- if tools %}<|system|>Answer a call as one JSON object {"name": function, "parameters": arguments}.\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|end|>{%- endif %}"
) + _TURNS.replace(
    "CALLS",
    "<|python_tag|>{% for c in m.tool_calls %}"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
    "{% if not loop.last %}; {% endif %}{% endfor %}",
).replace("RESULT", "[output] {{ m.content }}")
HERMES_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}<|system|>Functions:\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    'Call one as <tool_call>\n{"name": name, "arguments": object}\n</tool_call><|end|>{%- endif %}'
) + _TURNS.replace(
    "CALLS",
    "{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}",
).replace("RESULT", "<tool_response>\n{{ m.content }}\n</tool_response>")
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "hermes": HERMES_TEMPLATE}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
        "additionalProperties": False}}}  # fmt: skip
TOOLS = [WEATHER, NOOP]


def build_tool_model(root: Path, style: str) -> Path:
    """The demo model's weights and tokenizer with the ``style`` chat template, in ``root/tools-<style>``."""
    path = build_tiny_llama(Path(root) / f"tools-{style}")
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("chat_template") != TEMPLATES[style]:
        config["chat_template"] = TEMPLATES[style]
        config_path.write_text(json.dumps(config, indent=2))
    return path
