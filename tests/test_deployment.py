"""The deployment files (Procfile, docker-compose.yml): Flower stays on loopback and needs
credentials."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flower_metrics_are_not_published_beyond_loopback() -> None:
    """Flower 2.2 serves /metrics with no auth whatever --basic-auth says; the Procfile
    and compose keep the port on loopback."""
    procfile = (ROOT / "Procfile").read_text()
    flower_line = next(line for line in procfile.splitlines() if line.startswith("flower:"))
    assert "--address=127.0.0.1" in flower_line and "--basic-auth=" in flower_line
    compose = (ROOT / "docker-compose.yml").read_text()
    assert '"127.0.0.1:5555:5555"' in compose


def test_compose_flower_refuses_to_start_without_credentials() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    flower = " ".join(compose["services"]["flower"]["command"])
    assert re.search(r"--basic-auth=\$\{FLOWER_USER[^}]*\}:\$\{FLOWER_PASSWORD:\?", flower)
    redis_service = " ".join(compose["services"]["redis"]["command"])
    assert "--requirepass" in redis_service and "${REDIS_PASSWORD:?" in redis_service
    makefile = (ROOT / "Makefile").read_text()
    flower_target = makefile.split("\nflower:", 1)[1].split("\n\n", 1)[0]
    assert "--address=127.0.0.1" in flower_target  # unauthenticated only on loopback
