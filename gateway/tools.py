"""Tools: `tools`, `tool_choice` and `parallel_tool_calls` in; the model's calls out as OpenAI `tool_calls`.

The tools are rendered by the model's own chat template (its `tools` variable, as transformers passes it). Two
output formats are read, chosen by what the template writes:

- Llama 3.1 ("llama3": the template mentions <|python_tag|>): the answer is a JSON object {"name", "parameters"},
  possibly after <|python_tag|>; several calls are separated by ";".
- Hermes / Qwen2.5 ("hermes": the template mentions <tool_call>): each call is <tool_call>{"name",
  "arguments"}</tool_call>; text outside the tags is the message's content.

tool_choice "auto" lets the model choose (its output is parsed when it looks like a call); "none" renders no
tools and parses nothing; "required" or a named function constrain the output with a grammar (one call, or
several with parallel_tool_calls) so a valid call always comes out. A template that renders tools in neither
format is refused with a 400 naming `tools`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from gateway.errors import ApiError
from gateway.structured import checked, parse_response_format
from protocol import structured

FORMATS = {"hermes": "arguments", "llama3": "parameters"}  # format -> the key that holds a call's arguments
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request. ``required``: a call must come out (``only`` names the one tool allowed)."""

    tools: list[dict]
    fmt: str
    required: bool = False
    only: str | None = None
    parallel: bool = True

    def grammar(self) -> str | None:
        """The engine's grammar request that forces a call (None when the model may answer in text)."""
        if not self.required:
            return None
        key = FORMATS[self.fmt]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for f in (t["function"] for t in self.tools)
            if self.only in (None, f["name"])
        ]
        body = f"body: %json {json.dumps(structured.guided({'anyOf': calls}))}"
        if self.fmt == "hermes":
            call = f"call: {json.dumps(HERMES_OPEN + chr(10))} body {json.dumps(chr(10) + HERMES_CLOSE)}"
            start = 'start: call ("\\n" call)*' if self.parallel else "start: call"
        else:
            call = "call: body"
            start = 'start: call (";" call)*' if self.parallel else "start: call"
        return structured.lark("\n".join([start, call, body]), "tools")


def _refuse(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}' {message}", param=param)


def tool_format(template: str | None) -> str | None:
    """Which tool-call format the chat template writes (None: neither that WarmServe reads)."""
    template = template or ""
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template:
        return "llama3"
    return None


def parse_tools(body: dict, template: str | None) -> ToolRequest | None:
    """The request's tools (None: no tools, or tool_choice "none"); a 400 naming the field that is wrong."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool | None):
        raise _refuse("parallel_tool_calls", "must be a boolean")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise _refuse("tool_choice", "needs 'tools' to choose from")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _refuse("tools", f"must be a list of at most {MAX_TOOLS} function tools")
    tools = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise _refuse("tools", "names each function once only")
    if choice == "none":
        return None
    fmt = tool_format(template)
    if fmt is None:
        raise _refuse("tools", "can't be used with this function: its model's chat template renders no tool calls "
                      "in a format WarmServe reads (Llama 3.1 or Hermes/Qwen2.5)")  # fmt: skip
    request = ToolRequest(tools, fmt, parallel=parallel is not False, **_choice(choice, names))
    if request.required:
        checked(request.grammar())
    return request


def _tool(tool: object, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise _refuse("tools", f"[{i}] must be {{'type': 'function', 'function': {{...}}}}")
    f = tool["function"]
    if not isinstance(f.get("name"), str) or not NAME.match(f["name"]):
        raise _refuse("tools", f"[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    if not isinstance(f.get("parameters", {}), dict | None):
        raise _refuse("tools", f"[{i}].function.parameters must be a JSON Schema object")
    if not isinstance(f.get("description", ""), str | None):
        raise _refuse("tools", f"[{i}].function.description must be a string")
    if f.get("parameters"):  # each schema alone, so the error names the tool
        try:
            structured.check(structured.json_schema(f["parameters"], "tools"))
        except structured.GrammarError as exc:
            raise _refuse("tools", f"[{i}].function.parameters: {exc.detail}") from None
    return {"type": "function", "function": f}


def _choice(choice: object, names: list[str]) -> dict:
    if choice in (None, "auto"):
        return {}
    if choice == "required":
        return {"required": True}
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise _refuse("tool_choice", f"names function {str(name)[:64]!r}, which is not in 'tools'")
        return {"required": True, "only": name}
    raise _refuse("tool_choice", "must be none, auto, required or {'type': 'function', 'function': {'name': ...}}")


def message_fields(m: dict, i: int) -> dict:
    """A chat message's tool fields, as chat templates read them: an assistant's ``tool_calls`` (arguments as
    objects, not JSON text) and a tool result's ``tool_call_id``."""
    out: dict = {}
    calls = m.get("tool_calls")
    if calls is not None:
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise _refuse("messages", f"[{i}].tool_calls must be a list on an assistant message")
        out["tool_calls"] = [_past_call(c, i) for c in calls]
    if m.get("role") == "tool" and m.get("tool_call_id") is not None:
        out["tool_call_id"] = str(m["tool_call_id"])
    return out


def _past_call(call: object, i: int) -> dict:
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise _refuse("messages", f"[{i}].tool_calls entries need a function with a name")
    arguments = f.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise _refuse("messages", f"[{i}].tool_calls arguments must be JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": f["name"], "arguments": arguments}}


# ---- the answer ----


def _call(obj: object, fmt: str) -> dict | None:
    """An OpenAI tool call from one parsed JSON value, or None if it isn't one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(FORMATS[fmt], obj.get("arguments", obj.get("parameters", {})))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_calls(text: str, request: ToolRequest) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole answer; content is None when only calls came out."""
    if request.fmt == "hermes":
        content, calls = _hermes(text)
    else:
        content, calls = _llama3(text)
    calls = [c for c in (_call(o, request.fmt) for o in calls) if c is not None]
    calls = [{**c, "index": k} for k, c in enumerate(calls if request.parallel else calls[:1])]
    return (content if content.strip() or not calls else None), calls


def _hermes(text: str) -> tuple[str, list]:
    content, calls, rest = [], [], text
    while HERMES_OPEN in rest:
        before, _, after = rest.partition(HERMES_OPEN)
        body, closed, rest = after.partition(HERMES_CLOSE)
        obj = _json(body.strip())
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):  # not a call after all: keep the text
            content.append(before + HERMES_OPEN + body + (HERMES_CLOSE if closed else ""))
            continue
        content.append(before)
        calls.append(obj)
    content.append(rest)
    return "".join(content).strip(), calls


def _llama3(text: str) -> tuple[str, list]:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    objs = [_json(part) for part in _split_top_level(body, ";")]
    if not objs or any(not isinstance(o, dict) or "name" not in o for o in objs):
        return text, []
    return "", objs


def _split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside JSON strings and brackets."""
    parts, depth, in_str, escaped, start = [], 0, False, False, 0
    for k, ch in enumerate(text):
        if in_str:
            escaped, in_str = (not escaped and ch == "\\"), in_str and (escaped or ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:k].strip())
            start = k + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


@dataclass
class ToolStream:
    """Streams one sequence's answer as OpenAI deltas: text as content while it can't be part of a call, each
    call as one tool_calls delta once it is complete (Hermes), or all calls at the end (Llama 3.1, whose answer
    is either entirely calls or entirely text)."""

    request: ToolRequest
    held: str = ""
    sent_calls: int = 0
    mode: str = "undecided"  # llama3: "text" or "calls" once the first non-blank character is seen
    called: bool = False

    def feed(self, text: str) -> list[dict]:
        self.held += text
        if self.request.fmt == "llama3":
            return self._feed_llama3()
        return self._feed_hermes(final=False)

    def finish(self) -> list[dict]:
        """The deltas still held when the sequence ends."""
        if self.request.fmt == "llama3":
            content, calls = parse_calls(self.held, self.request) if self.mode != "text" else (self.held, [])
            self.held = ""
            return self._deltas(content, calls)
        return self._feed_hermes(final=True)

    def _feed_llama3(self) -> list[dict]:
        if self.mode == "undecided":
            stripped = self.held.lstrip()
            if not stripped or PYTHON_TAG.startswith(stripped):
                return []
            self.mode = "calls" if stripped.startswith(("{", PYTHON_TAG)) else "text"
        if self.mode == "calls":
            return []
        out, self.held = self.held, ""
        return self._deltas(out, [])

    def _feed_hermes(self, final: bool) -> list[dict]:
        deltas: list[dict] = []
        while True:
            start = self.held.find(HERMES_OPEN)
            if start < 0:  # all text, but for a tail that may still become <tool_call>
                cut = len(self.held) - (0 if final else _partial_suffix(self.held, HERMES_OPEN))
                deltas += self._deltas(self.held[:cut], [])
                self.held = self.held[cut:]
                return deltas
            deltas += self._deltas(self.held[:start], [])
            self.held = self.held[start:]
            end = self.held.find(HERMES_CLOSE)
            if end < 0 and not final:
                return deltas
            stop = len(self.held) if end < 0 else end + len(HERMES_CLOSE)
            content, calls = parse_calls(self.held[:stop], self.request)
            self.held = self.held[stop:]
            if not calls:  # not a call after all: its text is content
                deltas += self._deltas(content, [])
            elif self.request.parallel or not self.called:
                deltas += self._deltas(None, calls)

    def _deltas(self, content: str | None, calls: list[dict]) -> list[dict]:
        # blanks between calls are not worth a content delta
        out: list[dict] = [{"content": content}] if content and (content.strip() or not self.called) else []
        for c in calls:
            out.append({"tool_calls": [{**c, "index": self.sent_calls}]})
            self.sent_calls += 1
            self.called = True
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def output_grammar(body: dict, tools: ToolRequest | None) -> str | None:
    """The grammar request constraining a chat answer: a forced tool call, or response_format's."""
    requested = parse_response_format(body)
    forced = tools.grammar() if tools is not None else None
    if forced is not None and requested is not None:
        raise _refuse("tool_choice", "can't force a tool call while 'response_format' also constrains the answer")
    return forced or requested


def answer_message(text: str, request: ToolRequest) -> tuple[dict, bool]:
    """A whole chat answer as OpenAI's assistant message, and whether it called tools."""
    content, calls = parse_calls(text, request)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content, "tool_calls": calls}, True


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI says "tool_calls" when an answer that ended by itself called tools."""
    return "tool_calls" if called and reason == "stop" else reason
