"""A function: one model endpoint, as the user writes it in YAML.

The spec is validated completely before anything is stored, so a bad file is rejected whole (file, field, reason)
and nothing is ever half-deployed. It crosses process boundaries as JSON (`to_json`/`from_json`), so the gateway,
the workers and the warmer all read exactly this shape.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from modelinfo import DTYPE_BYTES, ModelFileError, load_model_config

ENGINES = ("builtin", "transformers")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
CACHE_PREFIX = "cache:"
DEFAULT_MAX_MODEL_LEN = 2048  # or the model's own limit when smaller; every token of it reserves KV memory


class SpecError(ValueError):
    """A function spec that can't be deployed; the message names the source, the field and the reason."""

    def __init__(self, source: str, field_name: str, reason: str) -> None:
        self.source, self.field, self.reason = source, field_name, reason
        super().__init__(f"{source}: field '{field_name}': {reason}")


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
        raw = orjson.loads(data)
        return cls(**{**raw, "scaling": Scaling(**raw["scaling"]), "slo": Slo(**raw["slo"])})


@dataclass(frozen=True)
class Footprint:
    """What one instance of a function takes on a GPU, exactly as the worker's memory pool reserves it."""

    weight_bytes: int  # the weights in the serving dtype
    kv_bytes: int  # the KV cache a HOT instance reserves: `kv_seqs` sequences at max_model_len


def footprint(spec: FunctionSpec, kv_seqs: int) -> Footprint:
    """Size a function from its model's config (ModelFileError if the files went bad since it was deployed)."""
    cfg = load_model_config(spec.model)
    per_token = cfg.kv_bytes_per_token(spec.dtype)
    return Footprint(cfg.weight_bytes(spec.dtype), per_token * spec.max_model_len * kv_seqs)


def cache_dir() -> Path:
    """Where WarmServe keeps what it generates (the offline demo model): $WARMSERVE_CACHE or ~/.cache/warmserve."""
    return Path(os.environ.get("WARMSERVE_CACHE", Path.home() / ".cache" / "warmserve"))


def resolve_model_path(model: str, base_dir: Path | None) -> Path:
    """`cache:NAME` lives in the cache dir; relative paths are relative to the YAML file; `~` expands."""
    if model.startswith(CACHE_PREFIX):
        return cache_dir() / "models" / model[len(CACHE_PREFIX) :]
    path = Path(os.path.expanduser(model))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path.resolve()


def check_model_dir(path: Path) -> str | None:
    """Why `path` is not a loadable model directory, or None when it is."""
    if not path.is_dir():
        return f"model directory {path} does not exist"
    if not (path / "config.json").is_file():
        return f"{path} has no config.json"
    if not any(path.glob("*.safetensors")):
        return f"{path} has no *.safetensors weights"
    if not (path / "tokenizer.json").is_file():
        return f"{path} has no tokenizer.json"
    return None


def _int(source: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(source, name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(source, name, f"must be >= {minimum}, got {value}")
    return value


def _number(source: str, name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(source, name, f"must be a finite number, got {value!r}")
    if value < minimum:
        raise SpecError(source, name, f"must be >= {minimum}, got {value}")
    return float(value)


def _section(source: str, raw: dict, name: str, allowed: set[str]) -> dict:
    value = raw.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(source, name, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SpecError(source, f"{name}.{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return value


def parse_spec(raw: Any, source: str = "<spec>", base_dir: Path | None = None) -> FunctionSpec:
    """Validate a decoded YAML/JSON document into a FunctionSpec, or raise SpecError naming the field."""
    if not isinstance(raw, dict):
        raise SpecError(source, "<document>", f"must be a mapping, got {type(raw).__name__}")
    allowed = {"name", "model", "engine", "dtype", "max_model_len", "scaling", "slo"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(source, unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    for required in ("name", "model"):
        if required not in raw:
            raise SpecError(source, required, "is required")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(source, "name", f"must match {NAME_RE.pattern} (lowercase, digits, . _ -), got {name!r}")
    if not isinstance(raw["model"], str) or not raw["model"]:
        raise SpecError(source, "model", f"must be a path to a local model directory, got {raw['model']!r}")
    engine = raw.get("engine", "builtin")
    if engine not in ENGINES:
        raise SpecError(source, "engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    model = resolve_model_path(raw["model"], base_dir)
    problem = check_model_dir(model)
    if problem:
        raise SpecError(source, "model", problem)
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPE_BYTES:
        raise SpecError(source, "dtype", f"must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    try:
        limit = load_model_config(str(model), builtin=engine == "builtin").max_position_embeddings
    except ModelFileError as exc:
        raise SpecError(source, "model", str(exc)) from None
    max_model_len = _int(source, "max_model_len", raw.get("max_model_len", min(DEFAULT_MAX_MODEL_LEN, limit)), 16)
    if max_model_len > limit:
        raise SpecError(
            source,
            "max_model_len",
            f"{max_model_len} exceeds the model's max_position_embeddings ({limit}; a sliding window, when the "
            "model uses one, caps it too)",
        )
    sc = _section(source, raw, "scaling", {"min_instances", "max_instances", "keep_alive_s", "max_queue"})
    scaling = Scaling(
        min_instances=_int(source, "scaling.min_instances", sc.get("min_instances", 0), 0),
        max_instances=_int(source, "scaling.max_instances", sc.get("max_instances", 1), 1),
        keep_alive_s=_number(source, "scaling.keep_alive_s", sc.get("keep_alive_s", 300), 0),
        max_queue=_int(source, "scaling.max_queue", sc.get("max_queue", 256), 1),
    )
    if scaling.min_instances > scaling.max_instances:
        raise SpecError(source, "scaling.min_instances", "must not exceed scaling.max_instances")
    slo_raw = _section(source, raw, "slo", {"ttft_ms"})
    slo = Slo(ttft_ms=_number(source, "slo.ttft_ms", slo_raw.get("ttft_ms", 1000), 1))
    return FunctionSpec(str(name), str(model), engine, dtype, max_model_len, scaling, slo)


def parse_yaml(text: str, source: str = "<yaml>", base_dir: Path | None = None) -> FunctionSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        raise SpecError(source, "<yaml>", f"invalid YAML at {where}: {getattr(exc, 'problem', exc)}") from None
    return parse_spec(raw, source, base_dir)


def load_file(path: str | Path) -> FunctionSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), "<file>", f"cannot read: {exc.strerror}") from None
    return parse_yaml(text, str(path), path.parent.resolve())


def examples_dir() -> Path:
    """The example functions shipped in this package (deployed by `warmserve up`)."""
    return Path(__file__).parent
