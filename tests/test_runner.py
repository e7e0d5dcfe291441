"""The papermill runner: profiles, selection, failures reported by notebook and cell, and a quiet console."""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings

import nbformat
import pytest
from tqdm import TqdmWarning

from utils import config, publishing, quiet, runner
from utils.files import save_json
from utils.modeling import load_tokenizer
from utils.paths import PARAMS_DIR, PROGRESS_FILE


def write_notebook(path, *sources: str):
    """A notebook with a ``parameters`` cell (``x = 1``) and one code cell per source."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1  # a parameter")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(src) for src in sources)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def stderr_outputs(notebook) -> list[str]:
    """The stderr stream texts of an executed notebook."""
    nb = nbformat.read(notebook, as_version=4)
    return [o["text"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stderr"]


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
    source = write_notebook(tmp_path / "09_broken.ipynb", "raise ValueError('bad value of x')")
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
    monkeypatch.setattr(publishing, "run_dir", lambda name: tmp_path / "runs" / name)
    monkeypatch.setattr(publishing, "published_figures_dir", lambda name: tmp_path / "figures" / name)
    with pytest.raises(config.ProfileError, match="holds no figures"):
        publishing.publish_figures("demo")
    (tmp_path / "runs" / "demo" / "figures").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "figures" / "01_x.pdf").write_bytes(b"%PDF")
    (tmp_path / "runs" / "demo" / "figures" / "02_y.pdf").write_bytes(b"%PDF")  # notebook 02 did not finish
    (tmp_path / "runs" / "demo" / "01_run.json").write_text("{}")
    entry = {"caption": "x", "sources": [], "width_cm": 16.0, "model": "embedded", "profile": "demo", "date": "d"}
    (tmp_path / "runs" / "demo" / "figures" / "figuras.json").write_text(json.dumps({"01_x": entry, "02_y": entry}))
    (tmp_path / "figures" / "demo").mkdir(parents=True)  # an earlier publication listed notebook 00's figure
    (tmp_path / "figures" / "demo" / "figuras.json").write_text(json.dumps({"00_z": entry}))
    target = publishing.publish_figures("demo")
    assert (target / "01_x.pdf").read_bytes() == b"%PDF"
    assert sorted(p.name for p in target.iterdir()) == ["01_x.pdf", "figuras.json", "figuras.tex"]
    assert list(json.loads((target / "figuras.json").read_text())) == ["00_z", "01_x"]
    assert "01_x" in (target / "figuras.tex").read_text() and "02_y" not in (target / "figuras.tex").read_text()


def test_a_run_sets_the_kernels_environment_and_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """Called in-process (a notebook cell, a test), the runner's QLORA_* variables reach the notebooks it runs and
    are gone afterwards: a benchmark run later in the same process recorded the runner's command as its own."""
    monkeypatch.setattr(runner, "run_dir", lambda name: tmp_path / name)
    monkeypatch.setenv("QLORA_FIGURES_DIR", "/somewhere/of/mine")
    monkeypatch.delenv("QLORA_COMMAND", raising=False)
    monkeypatch.delenv("QLORA_PROFILE", raising=False)
    seen = []

    def fake_run(nb, out_dir, params, desc, log_output):
        seen.append({k: os.environ.get(k) for k in ("QLORA_PROFILE", "QLORA_FIGURES_DIR", "QLORA_COMMAND")})
        return 0.0

    monkeypatch.setattr(runner, "run_with_progress", fake_run)
    runner.run_profile("smoke", only=["01", "03"], run_name="mine")
    assert seen == [{"QLORA_PROFILE": "mine", "QLORA_FIGURES_DIR": str(tmp_path / "mine" / "figures"),
                     "QLORA_COMMAND": config.runner_command("smoke", [nb], "mine", [])} for nb in ("01", "03")]
    assert os.environ["QLORA_FIGURES_DIR"] == "/somewhere/of/mine"
    assert "QLORA_COMMAND" not in os.environ and "QLORA_PROFILE" not in os.environ


def test_publish_needs_a_complete_run():
    out = subprocess.run([sys.executable, "-m", "utils.runner", "--profile", "smoke", "--only", "01", "--publish"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "--publish needs a complete run" in out.stderr


def test_dead_kernel_names_the_notebook_and_its_kernel_log(tmp_path):
    source = write_notebook(tmp_path / "09_dies.ipynb", "import os\nos._exit(3)")
    with pytest.raises(runner.NotebookFailed, match="kernel died") as info:
        runner.run_notebook(source, tmp_path / "out" / "09_dies.ipynb", {}, log_output=False)
    assert "09_dies.ipynb" in str(info.value) and "09_kernel.log" in str(info.value)


# --------------------------------------------------------------------------------------------
# A quiet run: one line per notebook with its progress, no transport warning, no known library noise
# --------------------------------------------------------------------------------------------


def test_console_line_follows_cells_then_training_steps_and_the_kernel_is_quiet(tmp_path):
    progress_file = tmp_path / PROGRESS_FILE
    steps = ("import json, time\n"
             "for step in range(1, 4):\n"
             f"    open({str(progress_file)!r}, 'w').write(json.dumps({{'step': step, 'max_steps': 3}}))\n"
             "    time.sleep(0.6)\n"
             "time.sleep(0.6)")
    # The two warnings the kernel's startup filters (utils/quiet.py) and one of ours, which must still show.
    noise = ("import logging, warnings\n"
             "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
             "'Failed to load CPU gemm_4bit_forward from kernels-community: no kernels')\n"
             "warnings.warn_explicit('`is_gradient_checkpointing` is deprecated and will be removed in v6.',"
             " FutureWarning, 'modeling_utils.py', 1, module='transformers.modeling_utils')\n"
             "warnings.warn('ours', UserWarning)")
    source = write_notebook(tmp_path / "04_demo.ipynb", noise, steps)
    console = io.StringIO()
    progress = runner.NotebookProgress("[4/5] 04_demo (test)", progress_file, stream=console)
    runner.run_notebook(source, tmp_path / "out" / "04_demo.ipynb", {}, False, progress)
    progress.close("ok (3 s)")
    last = console.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("[4/5] 04_demo (test) 100%|") and "3/3 step" in last and last.endswith("ok (3 s)")
    stderr = stderr_outputs(tmp_path / "out" / "04_demo.ipynb")
    assert len(stderr) == 1 and "UserWarning: ours" in stderr[0], stderr
    kernel_log = (tmp_path / "out" / "04_kernel.log").read_text()
    assert "without encryption" not in kernel_log


def test_progress_file_is_read_only_when_this_run_wrote_it(tmp_path):
    path = tmp_path / "04_progress.json"
    save_json({"step": 7, "max_steps": 10}, path)
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # left over from an earlier run
    progress = runner.NotebookProgress("x", path, stream=io.StringIO())
    try:
        assert progress.read_steps() is None
        save_json({"step": 2, "max_steps": 10}, path)
        assert progress.read_steps() == (2, 10)
        path.write_text('{"step": 3, "max_')  # a half-written file is skipped, not an error
        assert progress.read_steps() is None
    finally:
        progress.close("ok")


def test_training_progress_file_is_the_one_the_runner_follows(tmp_path):
    assert runner.progress_path(tmp_path, runner.NOTEBOOKS_DIR / "04_training.ipynb") == tmp_path / PROGRESS_FILE


def test_quiet_known_noise_drops_only_the_known_messages(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")  # the user's own setting wins
    quiet.quiet_known_noise()
    quiet.quiet_known_noise()  # idempotent
    bnb = logging.getLogger(quiet.BNB_CPU_LOGGER)
    assert sum(isinstance(f, quiet.DropMessage) for f in bnb.filters) == 1
    assert not bnb.filter(bnb.makeRecord(bnb.name, logging.WARNING, "ops.py", 1, quiet.BNB_CPU_MESSAGE + ": x",
                                         (), None))
    assert bnb.filter(bnb.makeRecord(bnb.name, logging.WARNING, "ops.py", 1, "another problem", (), None))
    with warnings.catch_warnings(record=True) as caught:
        quiet.quiet_known_noise()  # catch_warnings reset the filters
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                               FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("IProgress not found. Please update jupyter and ipywidgets.", TqdmWarning,
                               "auto.py", 1, module="tqdm.auto")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "mine.py", 1,
                               module="mine")
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "0"


def test_gguf_loader_bar_is_off_only_inside_the_block_and_only_when_bars_are_off(monkeypatch):
    module = importlib.import_module(quiet.GGUF_LOADER_MODULE)
    original = module.tqdm
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with quiet.quiet_gguf_loader():
        assert module.tqdm(range(3), file=io.StringIO()).disable
    assert module.tqdm is original
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user asked for the bars
    with quiet.quiet_gguf_loader():
        assert module.tqdm is original
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with pytest.raises(RuntimeError, match="inside"), quiet.quiet_gguf_loader():  # an error restores the bar too
        raise RuntimeError("inside")
    assert module.tqdm is original


def test_importing_utils_drops_the_bitsandbytes_hub_message_and_nothing_else():
    """The commands import ``utils`` before bitsandbytes: its hub probe's line is dropped there, and only that (the
    progress bars and warnings stay the user's until a notebook or child calls quiet_known_noise)."""
    code = ("import logging, os, utils; from utils import quiet; bnb = logging.getLogger(quiet.BNB_CPU_LOGGER); "
            "print(sum(isinstance(f, quiet.DropMessage) for f in bnb.filters), "
            "os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["1", "None"]
    # and a command, end to end: on a CPU where bitsandbytes probes the hub, its line would open the help text
    done = subprocess.run([sys.executable, "-m", "utils.training", "--help"], capture_output=True, text=True,
                          check=True)
    assert quiet.BNB_CPU_MESSAGE not in done.stdout + done.stderr and done.stdout.startswith("usage:")


def test_llama_tokenizer_decodes_without_the_bpe_cleanup_warning():
    tokenizer = load_tokenizer("llama-3.2")
    assert tokenizer.clean_up_tokenization_spaces is False
    text = "Hola , ¿qué tal ? Artículo 12 , inciso b ."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # the spaces before punctuation stay, as they did with the warning
