"""A function: one model endpoint, as the user writes it in YAML.

The spec is validated completely before anything is stored, so a bad file is rejected whole (file, field, reason)
and nothing is ever half-deployed. It crosses process boundaries as JSON (`to_json`/`from_json`), so the gateway,
the workers and the warmer all read exactly this shape.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from modelinfo import DTYPE_BYTES, ModelFileError, load_model_config

ENGINES = ("builtin", "transformers")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # always matched whole (fullmatch): no trailing newline
CACHE_PREFIX = "cache:"
DEFAULT_MAX_MODEL_LEN = 2048  # or the model's own limit when smaller; every token of it reserves KV memory
# A spec is a flat mapping with two small sections, so anything deeper or bigger is hostile or a mistake. These
# bound the work one document can cause: nesting (PyYAML and the checks recurse) and nodes counted with every
# alias expanded (a 300-byte "billion laughs" document otherwise expands to gigabytes when printed).
MAX_DEPTH = 8
MAX_NODES = 1000
MAX_PATH = 1024  # characters in a model path; the OS allows 4096, a model directory never needs that many
QUOTE_CHARS = 40  # error messages quote at most this much of a value
MAX_PROBLEMS = 10  # an error lists at most this many problems (a hostile document may have a thousand)


class SpecError(ValueError):
    """A function spec that can't be deployed; the message names the source and every field with its reason.

    `field` and `reason` are the first problem's (an HTTP 400 names one `param`); `problems` holds them all, so a
    file with several mistakes is fixed in one round instead of one error at a time."""

    def __init__(self, source: str, field_name: str, reason: str, more: Sequence[tuple[str, str]] = ()) -> None:
        self.source, self.field, self.reason = source, field_name, reason
        self.problems = [(field_name, reason), *more]
        super().__init__(_message(source, self.problems))


def _message(source: str, problems: list[tuple[str, str]]) -> str:
    """`f.yaml: field 'a': reason; field 'b': reason`, at most MAX_PROBLEMS of them."""
    shown = "; ".join(f"field '{f}': {r}" for f, r in problems[:MAX_PROBLEMS])
    rest = f"; and {len(problems) - MAX_PROBLEMS} more problems" if len(problems) > MAX_PROBLEMS else ""
    return f"{source}: {shown}{rest}"


class _Problems:
    """Every problem of one document, collected so they are reported together (`done` raises them as one)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.found: list[tuple[str, str]] = []

    def add(self, field_name: str, reason: str) -> None:
        self.found.append((field_name, reason))

    def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(self.source, *args)`, or None with its SpecError's problems recorded."""
        try:
            return fn(self.source, *args)
        except SpecError as exc:
            self.found += exc.problems
            return None

    def done(self) -> None:
        if self.found:
            raise SpecError(self.source, *self.found[0], more=self.found[1:])


@dataclass(frozen=True)
class Scaling:
    min_instances: int = 0
    max_instances: int = 1
    keep_alive_s: float = 300.0
    max_queue: int = 256  # invocations waiting beyond this get 429 + Retry-After


@dataclass(frozen=True)
class Slo:
    ttft_ms: float = 1000.0


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    model: str  # resolved absolute path of a local Hugging Face directory
    engine: str = "builtin"
    dtype: str = "float32"
    max_model_len: int = 2048
    scaling: Scaling = field(default_factory=Scaling)
    slo: Slo = field(default_factory=Slo)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> FunctionSpec:
        """Read a stored spec, checking its shape (not the files): SpecError when the entry is not one we wrote."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise SpecError("<stored>", "<document>", "is not JSON") from None
        return check_fields(raw, "<stored>", Path(raw["model"]) if _stored_model(raw) else None)


@dataclass(frozen=True)
class Footprint:
    """What one instance of a function takes on a GPU, exactly as the worker's memory pool reserves it."""

    weight_bytes: int  # the weights in the serving dtype
    kv_bytes: int  # the KV cache a HOT instance reserves: `kv_seqs` sequences at max_model_len


def footprint(spec: FunctionSpec, kv_seqs: int) -> Footprint:
    """Size a function from its model's config (ModelFileError if the files went bad since it was deployed)."""
    cfg = load_model_config(spec.model, builtin=spec.engine == "builtin")
    per_token = cfg.kv_bytes_per_token(spec.dtype)
    return Footprint(cfg.weight_bytes(spec.dtype), per_token * spec.max_model_len * kv_seqs)


def cache_dir() -> Path:
    """Where WarmServe keeps what it generates (the offline demo model): $WARMSERVE_CACHE or ~/.cache/warmserve."""
    return Path(os.environ.get("WARMSERVE_CACHE", Path.home() / ".cache" / "warmserve"))


def models_dir() -> Path:
    """Where `cache:NAME` models live."""
    return cache_dir() / "models"


def model_roots(extra: str = "") -> list[Path]:
    """The directories a deployed model may live in: the cache's models dir and `extra` (os.pathsep-separated,
    `Settings.model_roots`)."""
    return [models_dir(), *(Path(p) for p in extra.split(os.pathsep) if p)]


def quote(value: Any) -> str:
    """A value for an error message: its repr, cut to a short prefix (values come from untrusted documents)."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def resolve_model_path(model: str, base_dir: Path | None) -> Path:
    """`cache:NAME` lives in the cache's models dir; relative paths are relative to the YAML file; `~` expands.

    Symlinks are resolved here, so the roots check sees where a path really leads. Without `base_dir` (a spec that
    came over the network) a relative path has nothing it could be relative to and is refused."""
    if model.startswith(CACHE_PREFIX):
        name = model[len(CACHE_PREFIX) :]
        if not name or ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError("cache:NAME takes a directory name inside the cache, without '..'")
        return (models_dir() / name).resolve()
    path = Path(os.path.expanduser(model))
    if not path.is_absolute():
        if base_dir is None:
            raise ValueError("must be an absolute path or cache:NAME")
        path = base_dir / path
    return path.resolve()


def check_model_dir(path: Path) -> str | None:
    """Why `path` is not a loadable model directory, or None when it is."""
    try:
        if not path.is_dir():
            return f"model directory {path} does not exist"
        if not (path / "config.json").is_file():
            return f"{path} has no config.json"
        if not any(path.glob("*.safetensors")):
            return f"{path} has no *.safetensors weights"
        if not (path / "tokenizer.json").is_file():
            return f"{path} has no tokenizer.json"
    except OSError as exc:
        return f"model directory {path} cannot be read ({exc.strerror})"
    return None


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether a resolved path lies in one of the model roots (each resolved too, so a symlinked root works)."""
    return any(path.is_relative_to(root.resolve()) for root in roots)


def _int(source: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(source, name, f"must be an integer, got {quote(value)}")
    if value < minimum:
        raise SpecError(source, name, f"must be >= {minimum}, got {quote(value)}")
    return value


def _number(source: str, name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(source, name, f"must be a finite number, got {quote(value)}")
    if value < minimum:
        raise SpecError(source, name, f"must be >= {minimum}, got {quote(value)}")
    return float(value)


def check_shape(doc: Any, source: str) -> None:
    """Refuse documents too deep or too big (aliases expanded), and mappings with keys that are not strings.

    Iterative, so a hostile depth can't exhaust the stack; a recursive alias (`&a [*a]`) simply runs out of
    nodes."""
    stack, nodes = [(doc, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SpecError(source, "<document>", f"is too big (over {MAX_NODES} values, aliases expanded)")
        if depth > MAX_DEPTH:
            raise SpecError(source, "<document>", f"is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            bad = next((k for k in value if not isinstance(k, str)), None)
            if bad is not None:
                raise SpecError(source, "<document>", f"mapping keys must be strings, got {quote(bad)}")
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _unknown(problems: _Problems, mapping: dict, allowed: set[str], prefix: str = "") -> None:
    for key in sorted(set(mapping) - allowed):
        problems.add(prefix + key[:QUOTE_CHARS], f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _section(problems: _Problems, raw: dict, name: str, allowed: set[str]) -> dict:
    """A sub-mapping (`scaling`, `slo`) with its unknown fields recorded; {} when absent or not a mapping."""
    value = raw.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(name, f"must be a mapping, got {type(value).__name__}")
        return {}
    _unknown(problems, value, allowed, f"{name}.")
    return value


def _stored_model(raw: Any) -> bool:
    """Whether a stored entry has a model path we could have written (absolute, resolved, sane)."""
    model = raw.get("model") if isinstance(raw, dict) else None
    return isinstance(model, str) and 0 < len(model) <= MAX_PATH and "\x00" not in model and model.startswith("/")


def _model(source: str, raw: dict, base_dir: Path | None, roots: Sequence[Path] | None) -> Path:
    """The model's resolved directory; inside `roots` when they are given (None: a local, trusted file)."""
    value = raw["model"]
    if not isinstance(value, str) or not value:
        raise SpecError(source, "model", f"must be a path to a local model directory, got {quote(value)}")
    if len(value) > MAX_PATH or "\x00" in value:
        raise SpecError(source, "model", f"must be a path of at most {MAX_PATH} characters without NUL")
    try:
        model = resolve_model_path(value, base_dir)
    except (ValueError, OSError) as exc:  # OSError: a path the OS refuses (a component over 255 bytes)
        reason = exc if isinstance(exc, ValueError) else "the OS refuses this path"
        raise SpecError(source, "model", f"{quote(value)}: {reason}") from None
    if roots is not None and not inside(model, roots):
        # the same answer whether or not the path exists: the gateway is not a probe of the host's files
        where = ", ".join(str(r) for r in roots)
        raise SpecError(source, "model", f"{quote(value)} is outside the model roots ({where}); use cache:NAME")
    return model


def _limit(source: str, model: Path, engine: str) -> int:
    problem = check_model_dir(model)
    if problem:
        raise SpecError(source, "model", problem)
    try:
        return load_model_config(str(model), builtin=engine == "builtin").max_position_embeddings
    except ModelFileError as exc:
        raise SpecError(source, "model", str(exc)) from None


def parse_spec(
    raw: Any, source: str = "<spec>", base_dir: Path | None = None, roots: Sequence[Path] | None = None
) -> FunctionSpec:
    """Validate a decoded YAML/JSON document into a FunctionSpec, or raise one SpecError naming every bad field.

    `roots`: the directories a model may resolve into (the gateway passes its configured ones); None for a
    trusted local file (the CLI checking what it is about to send)."""
    check_shape(raw, source)  # past this, a document is small enough to check whole
    problems = _Problems(source)
    _check_head(raw, problems)
    model = limit = None
    if "model" in raw:
        model = problems.check(_model, raw, base_dir, roots)
    if model is not None:
        limit = problems.check(_limit, model, raw.get("engine", "builtin"))
    return _check_rest(raw, problems, model, limit)


def _check_head(raw: Any, problems: _Problems) -> None:
    """The document's keys, its name and its engine: what is checked before any file is looked at."""
    if not isinstance(raw, dict):  # nothing else can be checked
        raise SpecError(problems.source, "<document>", f"must be a mapping, got {type(raw).__name__}")
    _unknown(problems, raw, {"name", "model", "engine", "dtype", "max_model_len", "scaling", "slo"})
    for required in ("name", "model"):
        if required not in raw:
            problems.add(required, "is required")
    name = raw.get("name", "")
    if "name" in raw and (not isinstance(name, str) or not NAME_RE.fullmatch(name)):
        problems.add("name", f"must match {NAME_RE.pattern} (lowercase, digits, . _ -), got {quote(name)}")
    engine = raw.get("engine", "builtin")
    if not isinstance(engine, str) or engine not in ENGINES:
        problems.add("engine", f"must be one of {', '.join(ENGINES)}, got {quote(engine)}")


def check_fields(raw: Any, source: str, model: Path | None, limit: int | None = None) -> FunctionSpec:
    """Every check that needs no files; `limit` (the model's longest sequence) when the files were read.

    Stored entries come through here (with `model` as stored and no limit), so a registry entry that is not
    a spec we wrote is refused field by field."""
    problems = _Problems(source)
    _check_head(raw, problems)
    if model is None and "model" in raw:
        problems.add("model", f"must be a path to a local model directory, got {quote(raw['model'])}")
    return _check_rest(raw, problems, model, limit)


def _check_rest(raw: dict, problems: _Problems, model: Path | None, limit: int | None) -> FunctionSpec:
    """The fields after the head, each checked even when an earlier one is wrong; raises all problems found."""
    dtype = raw.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        problems.add("dtype", f"must be one of {', '.join(DTYPE_BYTES)}, got {quote(dtype)}")
    max_model_len = _max_model_len(raw, problems, limit)
    scaling = _scaling(raw, problems)
    slo_raw = _section(problems, raw, "slo", {"ttft_ms"})
    ttft_ms = problems.check(_number, "slo.ttft_ms", slo_raw.get("ttft_ms", 1000), 1)
    problems.done()
    engine = raw.get("engine", "builtin")
    return FunctionSpec(raw["name"], str(model), engine, dtype, max_model_len, scaling, Slo(ttft_ms=ttft_ms))


def _max_model_len(raw: dict, problems: _Problems, limit: int | None) -> int | None:
    if "max_model_len" not in raw and any(f == "model" for f, _ in problems.found):
        return None  # the default comes from the model's files, and the model is wrong (reported already)
    default_len = min(DEFAULT_MAX_MODEL_LEN, limit) if limit is not None else None
    value = problems.check(_int, "max_model_len", raw.get("max_model_len", default_len), 16)
    if value is not None and limit is not None and value > limit:
        problems.add(
            "max_model_len",
            f"{value} exceeds the model's max_position_embeddings ({limit}; a sliding window, when the "
            "model uses one, caps it too)",
        )
    return value


def _scaling(raw: dict, problems: _Problems) -> Scaling | None:
    sc = _section(problems, raw, "scaling", {"min_instances", "max_instances", "keep_alive_s", "max_queue"})
    values = {
        "min_instances": problems.check(_int, "scaling.min_instances", sc.get("min_instances", 0), 0),
        "max_instances": problems.check(_int, "scaling.max_instances", sc.get("max_instances", 1), 1),
        "keep_alive_s": problems.check(_number, "scaling.keep_alive_s", sc.get("keep_alive_s", 300), 0),
        "max_queue": problems.check(_int, "scaling.max_queue", sc.get("max_queue", 256), 1),
    }
    if None in values.values():
        return None
    if values["min_instances"] > values["max_instances"]:
        problems.add("scaling.min_instances", "must not exceed scaling.max_instances")
    return Scaling(**values)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit while composing: its composer recurses once per level, so a deep
    document would otherwise end in RecursionError before any check of ours could run."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """Decode one YAML document safely (no tags that build objects, bounded depth); SpecError when invalid."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds only plain data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = str(getattr(exc, "problem", None) or exc)[:200]
        raise SpecError(source, "<yaml>", f"invalid YAML at {where}: {problem}") from None


def parse_yaml(
    text: str, source: str = "<yaml>", base_dir: Path | None = None, roots: Sequence[Path] | None = None
) -> FunctionSpec:
    return parse_spec(load_yaml(text, source), source, base_dir, roots)


def read_file(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), "<file>", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def load_file(path: str | Path) -> FunctionSpec:
    path = Path(path)
    return parse_yaml(read_file(path), str(path), path.parent.resolve())


def load_document(path: str | Path) -> dict:
    """A spec file as the CLI sends it to a gateway: checked here first (so errors name the file), a relative
    model path made absolute against the file, and `cache:NAME` left for the gateway to resolve in its own cache."""
    path = Path(path)
    doc = load_yaml(read_file(path), str(path))
    load_file(path)
    model = doc["model"]
    if not model.startswith(CACHE_PREFIX):
        doc["model"] = str(resolve_model_path(model, path.parent.resolve()))
    return doc


def examples_dir() -> Path:
    """The example functions shipped in this package (deployed by `warmserve up`)."""
    return Path(__file__).parent
