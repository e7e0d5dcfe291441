"""Every result records where it came from: commit, exact command, device, versions."""

from __future__ import annotations

import re

from utils import provenance
from utils.paths import REPO_ROOT


def test_result_provenance_names_commit_and_command(monkeypatch):
    monkeypatch.delenv("QLORA_COMMAND", raising=False)
    record = provenance.result_provenance("python -m utils.speed.benchmark run --tiny")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", record["commit"])
    assert record["command"] == "python -m utils.speed.benchmark run --tiny"
    assert {"date", "device", "versions"} <= set(record)


def test_command_line_reads_as_typed(monkeypatch):
    monkeypatch.delenv("QLORA_COMMAND", raising=False)
    script = str(REPO_ROOT / "utils" / "memory" / "__main__.py")
    assert provenance.command_line([script, "gpu-report", "--out", "a b.json"]) == \
        "python -m utils.memory gpu-report --out 'a b.json'"
    assert "interactive" in provenance.command_line(["/env/ipykernel_launcher.py", "-f", "k.json"])
    monkeypatch.setenv("QLORA_COMMAND", "python -m utils.runner --profile demo --only 05")
    assert provenance.command_line() == "python -m utils.runner --profile demo --only 05"
