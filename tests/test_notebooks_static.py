"""Static checks of the committed notebooks: valid, stripped, parameters first, thin and safe."""

from __future__ import annotations

import ast
import json

import nbformat
import pytest

from utils.paths import NOTEBOOKS_DIR
from utils.runner import list_notebooks

NOTEBOOKS = list_notebooks()
EXPECTED = ["01_dataset_inspection", "02_quantization_memory", "03_lora_setup", "04_training", "05_evaluation"]


def test_the_five_numbered_notebooks_exist():
    assert [nb.stem for nb in NOTEBOOKS] == EXPECTED


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request):
    return request.param


def test_valid_nbformat(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)


def test_stripped_of_outputs(notebook):
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, notebook.name


def test_first_code_cell_is_parameters_with_plain_literals(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    for node in ast.parse(first.source).body:
        # Plain literals only: a derived value would go stale when papermill injects overrides.
        assert isinstance(node, ast.Assign), ast.dump(node)
        ast.literal_eval(node.value)
    for line in first.source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"{notebook.name}: parameter without a comment: {line!r}"


def test_declares_profile_and_model(notebook):
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    assert {"profile", "model_name"} <= set(declared)


def test_no_shell_installs_and_title_first(notebook):
    nb = nbformat.read(notebook, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "!pip" not in cell.source and "%pip" not in cell.source
    assert any("Conclusiones para la tesis" in c.source for c in nb.cells if c.cell_type == "markdown")


def test_setup_cell_second(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "%autoreload 2" in code[1].source
    # The figure context (model, profile, date in every caption) applies the style too.
    assert "set_figure_context(" in code[1].source
    assert "quiet_known_noise()" in code[1].source


def test_kernel_is_generic(notebook):
    nb = nbformat.read(notebook, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert NOTEBOOKS_DIR == notebook.parent


def test_ends_with_conclusions_appendix_and_references(notebook):
    """A thesis chapter: the body, then "Conclusiones para la tesis", "Apéndice técnico" and "Referencias"."""
    nb = nbformat.read(notebook, as_version=4)
    headers = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
               if line.startswith("## ")]
    assert headers[-3:] == ["## Conclusiones para la tesis", "## Apéndice técnico", "## Referencias"], headers[-4:]
