"""What a Windows user brings: folders with spaces and accents, files saved with CRLF (and a BOM) by an editor.

The folder ``Tesis UTN José`` stands for ``C:\\Users\\José\\Tesis UTN``; the files are copies of the shipped
sample corpus and smoke profile, saved the way Notepad or Excel save them.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from utils import config, runner
from utils.data import load_records
from utils.data.cli import main as data_cli
from utils.files import atomic_write_text, read_json, save_json
from utils.paths import PARAMS_DIR, REPO_ROOT, TEST_FILE, TRAIN_FILE, resolve_path

WINDOWS_LIKE = "Tesis UTN José"
BOM = b"\xef\xbb\xbf"
# Modules that exist only on POSIX: importing one at a module's top level breaks ``import utils...`` on Windows.
POSIX_ONLY = {"resource", "fcntl", "termios", "pwd", "grp", "pty", "tty", "posix"}


@pytest.fixture
def thesis_dir(tmp_path: Path) -> Path:
    """An empty folder named like a Windows user's thesis folder."""
    folder = tmp_path / WINDOWS_LIKE
    folder.mkdir()
    return folder


def save_as_windows(source: Path, target: Path, lines: int | None = None, bom: bool = False) -> Path:
    """Copy (the first ``lines`` lines of) a text file with CRLF endings, optionally behind a UTF-8 BOM."""
    text = source.read_text(encoding="utf-8").splitlines()[:lines]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((BOM if bom else b"") + "".join(f"{line}\r\n" for line in text).encode("utf-8"))
    return target


@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf+bom"])
def test_validate_accepts_windows_files_in_a_folder_with_spaces_and_accents(thesis_dir, monkeypatch, capsys, bom):
    train = save_as_windows(TRAIN_FILE, thesis_dir / "mis datos" / "entrenamiento José.jsonl", 6, bom)
    test = save_as_windows(TEST_FILE, thesis_dir / "mis datos" / "prueba José.jsonl", 3, bom)
    monkeypatch.chdir(thesis_dir)
    code = data_cli(["validate", "mis datos/entrenamiento José.jsonl", "mis datos/prueba José.jsonl",
                     "--no-tokenizer"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mis datos/entrenamiento José.jsonl" in out and "CRLF" in out
    assert load_records(train) == load_records(TRAIN_FILE)[:6]
    assert load_records(test) == load_records(TEST_FILE)[:3]


def test_profile_saved_with_crlf_and_bom_reads_like_the_original(thesis_dir, monkeypatch):
    shutil.copyfile(PARAMS_DIR / "smoke.yaml", thesis_dir / "smoke.yaml")
    save_as_windows(PARAMS_DIR / "smoke.yaml", thesis_dir / "mío.yaml", bom=True)
    monkeypatch.setattr(config, "PARAMS_DIR", thesis_dir)
    windows, original = config.load_profile("mío"), config.load_profile("smoke")
    assert windows == original
    assert runner.check_profile_keys("mío", windows) == runner.check_profile_keys("smoke", original)


def test_resolve_path_keeps_spaces_and_accents(thesis_dir, monkeypatch):
    data = thesis_dir / "mis datos" / "entrenamiento José.jsonl"
    assert resolve_path(data) == data
    assert resolve_path(str(data)) == data
    assert resolve_path("dataset/mi archivo ñandú.jsonl") == REPO_ROOT / "dataset" / "mi archivo ñandú.jsonl"
    monkeypatch.setenv("HOME", str(thesis_dir))
    assert resolve_path("~/mis datos/entrenamiento José.jsonl") == data


def test_atomic_writes_in_a_folder_with_spaces_and_accents(thesis_dir):
    target = thesis_dir / "resultados ñandú" / "04_run.json"
    save_json({"modelo": "SmolLM2 (embebido)", "carpeta": str(thesis_dir)}, target)
    save_json({"modelo": "Llama-3.2-3B", "carpeta": str(thesis_dir)}, target)  # over the first one
    assert read_json(target) == {"modelo": "Llama-3.2-3B", "carpeta": str(thesis_dir)}
    assert "José".encode("utf-8") in target.read_bytes() and b"\r\n" not in target.read_bytes()
    atomic_write_text(target.with_name("notas José.txt"), "línea 1\nlínea 2\n")
    assert target.with_name("notas José.txt").read_bytes() == "línea 1\nlínea 2\n".encode("utf-8")
    assert sorted(p.name for p in target.parent.iterdir()) == ["04_run.json", "notas José.txt"]  # no temp left


def test_runner_works_from_a_repository_in_a_folder_with_spaces_and_accents(thesis_dir):
    repo = thesis_dir / "qlora utn"
    shutil.copytree(REPO_ROOT / "utils", repo / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "notebooks" / "params").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "thesis"  # profile of the run')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import utils\nfrom utils.files import save_json\nfrom utils.paths import run_dir\n"
        "save_json({'utils': utils.__file__, 'run': str(run_dir(profile))}, run_dir(profile) / '01_where.json')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, repo / "notebooks" / "01_where.ipynb")
    (repo / "notebooks" / "params" / "tesis.yaml").write_bytes(
        b"description: a run from a Windows-like folder\r\ncommon:\r\n  profile: tesis\r\n")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-m", "utils.runner", "--profile", "tesis"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    where = json.loads((repo / "runs" / "tesis" / "01_where.json").read_text(encoding="utf-8"))
    assert where == {"utils": str(repo / "utils" / "__init__.py"), "run": str(repo / "runs" / "tesis")}
    assert "[1/1] 01_where (tesis)" in out.stdout and "ok (" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr and "without encryption" not in out.stdout + out.stderr


def test_no_module_imports_a_posix_only_module_at_its_top():
    found = []
    for path in sorted((REPO_ROOT / "utils").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO_ROOT)}:{node.lineno}: import {n}" for n in names
                      if n.split(".")[0] in POSIX_ONLY]
    assert not found, ("these imports fail on Windows (import them inside the function, with a fallback, as "
                       "utils/memory/process.py does): " + "; ".join(found))
