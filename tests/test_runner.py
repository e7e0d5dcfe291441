"""The papermill runner: profiles, selection and failures reported by notebook and cell."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from utils import config, runner
from utils.paths import PARAMS_DIR


def test_unknown_profile_lists_known_ones():
    out = subprocess.run(
        [sys.executable, "-m", "utils.runner", "--profile", "nope"], capture_output=True, text=True
    )
    assert out.returncode != 0
    for name in ("smoke", "demo", "thesis"):
        assert name in out.stderr
    assert "Traceback" not in out.stderr


def test_profiles_exist_and_parse():
    assert {"smoke", "demo", "thesis"} <= set(config.list_profiles())
    for name in config.list_profiles():
        profile = config.load_profile(name)
        assert profile["common"]["profile"] == name


def test_profile_keys_are_declared_by_their_notebooks():
    for name in config.list_profiles():
        runner.check_profile_keys(name, config.load_profile(name))


@pytest.mark.parametrize("block", ["common", "notebooks"])
def test_misspelt_profile_key_is_named(block):
    profile = config.load_profile("smoke")
    if block == "common":
        profile["common"]["max_seq_lenght"] = 256
    else:
        profile["notebooks"]["04"]["max_seq_lenght"] = 256
    with pytest.raises(config.ProfileError, match="max_seq_lenght") as info:
        runner.check_profile_keys("smoke", profile)
    assert "smoke.yaml" in str(info.value) and "max_seq_length" in str(info.value)


def test_only_selects_by_number():
    chosen = runner.select_notebooks(["3"])
    assert [nb.name[:2] for nb in chosen] == ["03"]
    assert [nb.name[:2] for nb in runner.select_notebooks(["01,03"])] == ["01", "03"]
    with pytest.raises(config.ProfileError, match="no notebook"):
        runner.select_notebooks(["99"])


def test_failure_names_notebook_and_cell(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1  # a parameter")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("raise ValueError('bad value of x')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "09_broken.ipynb"
    nbformat.write(nb, source)
    with pytest.raises(runner.NotebookFailed) as info:
        runner.run_notebook(source, tmp_path / "out.ipynb", {"x": 2}, log_output=False)
    message = str(info.value)
    assert "09_broken.ipynb" in message and "cell" in message and "bad value of x" in message


def test_profile_yaml_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PARAMS_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("common: [unclosed\n")
    with pytest.raises(config.ProfileError, match="bad.yaml"):
        config.load_profile("bad")
    assert PARAMS_DIR.is_dir()


def test_figures_go_to_the_run_and_publish_copies_them(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_dir", lambda name: tmp_path / "runs" / name)
    monkeypatch.setattr(runner, "published_figures_dir", lambda name: tmp_path / "figures" / name)
    with pytest.raises(config.ProfileError, match="holds no figures"):
        runner.publish_figures("demo")
    (tmp_path / "runs" / "demo" / "figures").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "figures" / "01_x.pdf").write_bytes(b"%PDF")
    target = runner.publish_figures("demo")
    assert (target / "01_x.pdf").read_bytes() == b"%PDF"
    assert sorted(p.name for p in target.iterdir()) == ["01_x.pdf"]


def test_publish_needs_a_complete_run():
    out = subprocess.run([sys.executable, "-m", "utils.runner", "--profile", "smoke", "--only", "01", "--publish"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "--publish needs a complete run" in out.stderr
