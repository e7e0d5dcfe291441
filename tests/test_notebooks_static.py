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


def test_demo_profile_keeps_each_story_inside_its_budget():
    """The demo (`make run`, 20 minutes on 2 cores) cuts sizes, never the comparisons the chapters make."""
    from utils.config import load_profile
    from utils.data import load_records
    from utils.evaluation.loading import select_records
    from utils.modeling import load_tokenizer

    blocks = load_profile("demo")["notebooks"]
    nb02, nb04, nb05 = blocks["02"], blocks["04"], blocks["05"]
    # 02: the memory story needs the fp32 and bf16 references and the NF4 pair; quality needs fp32 against 4 bits.
    assert {"fp32", "bf16", "nf4", "nf4_dq"} <= set(nb02["formats"])
    assert "fp32" in nb02["eval_formats"] and set(nb02["eval_formats"]) <= set(nb02["formats"])
    assert {"nf4", "nf4_dq", "fp4"} & set(nb02["eval_formats"])
    assert {"prepare", "no_prepare"} <= set(nb02["train_variants"])
    # 04: evaluations at the start (eval_on_start), the middle and the very end of training.
    assert nb04["max_steps"] % nb04["eval_steps"] == 0 and nb04["max_steps"] // nb04["eval_steps"] >= 2
    # 04: the stop-rate budget is above every validation reference answer, so a cut answer is the model's fault.
    tokenizer = load_tokenizer()
    longest = max(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
                  for r in load_records("dataset/utn_sample_validation.jsonl"))
    assert nb04["stop_max_new_tokens"] > longest, (nb04["stop_max_new_tokens"], longest)
    # 05: equal numbers of each kind of test question, and tuning against retrieval (the thesis's question).
    kinds = [r["kind"] for r in select_records(load_records("dataset/utn_sample_test.jsonl"), nb05["max_test_records"])]
    assert len(kinds) == nb05["max_test_records"] and len(set(kinds)) == 3
    assert len({kinds.count(k) for k in set(kinds)}) == 1, kinds
    assert "base_rag" in nb05["baselines"]
