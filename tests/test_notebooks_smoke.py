"""End to end: every notebook executes under papermill on the smallest profile, in one run shared by the tests here
(conftest.py's ``smoke_run``; they live in one file so that a parallel test run gives them to one worker)."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

from utils import evaluation as ev
from utils.paths import RUNS_DIR
from utils.runner import list_notebooks


@pytest.mark.slow
def test_all_notebooks_run_on_smoke(smoke_run):
    out = smoke_run  # python -m utils.runner --profile smoke, once per session (conftest.py)
    assert out.returncode == 0, out.stdout + out.stderr
    run = RUNS_DIR / "smoke"
    for source in list_notebooks():
        executed = nbformat.read(run / source.name, as_version=4)
        errors = [
            o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"
        ]
        assert not errors, source.name
        record = json.loads((run / f"{source.name[:2]}_run.json").read_text())
        assert record["profile"] == "smoke"
        assert record["wall_time_s"] > 0
    figures = list((run / "figures").glob("*.pdf"))
    assert figures, "smoke run wrote no figures"


@pytest.mark.slow
def test_notebook_05_runs_on_smoke(smoke_run):
    run = RUNS_DIR / "smoke"
    out = smoke_run  # every notebook, 04 and 05 included, run once per session (conftest.py)
    assert out.returncode == 0, out.stdout + out.stderr
    executed = nbformat.read(run / "05_evaluation.ipynb", as_version=4)
    html_outputs = "".join(o.get("data", {}).get("text/html", "") for c in executed.cells if c.cell_type == "code"
                           for o in c.get("outputs", []))
    assert "Pregunta" in html_outputs and "Referencia" in html_outputs  # picks shown side by side
    predictions = ev.read_jsonl(run / "05_predictions.jsonl")
    metrics = json.loads((run / "05_metrics.json").read_text())
    systems = metrics["systems"]
    assert {"base", "tuned"} <= set(systems) and metrics["n_test_records"] == len(predictions)
    assert {m["model"] for m in metrics["metrics"]} >= {*systems, "delta"}
    assert {m["metric"] for m in metrics["metrics"]} >= {"citation_accuracy", "number_match", "strict_correct"}
    assert len(predictions) == len(pd.read_csv(run / "05_respuestas.csv"))
    rubric = pd.read_csv(run / ev.BLANK_NAME)
    assert len(rubric) == len(predictions) * len(systems)
    figures = run / "figures"
    assert (figures / "05_respuestas.tex").read_text().count(r"\begin{longtable}") == 1
    for name in ("05_metricas_por_sistema", "05_etiquetas_error"):
        assert (figures / f"{name}.pdf").is_file(), name
    for name in ("05_metricas", "05_diferencias", "05_etiquetas_error", "05_subconjuntos"):
        assert (figures / f"{name}.tex").is_file(), name
    record = json.loads((run / "05_run.json").read_text())
    assert record["profile"] == "smoke" and record["n_test_records"] == len(predictions)
    # the Q8_0 GGUF of the merged embedded model loads back within its tolerance, read both ways (what
    # tests/test_gguf.py::test_roundtrip_within_tolerance checks for f16)
    from utils.evaluation.export import ROUNDTRIP_TOLERANCES

    report = record["gguf"]["roundtrip"]["q8_0"]
    assert report["passed"] and report["type"] == "q8_0" and report["tolerance"] == ROUNDTRIP_TOLERANCES["q8_0"]
    assert report["tokenizer_agreement"] == 1.0 and report["n_prompts"] >= 1
    assert report["llama_cpp_pre_tokenizer_hash_ok"] and report["transformers_gguf_reader"].startswith("counted")
    assert report["tokenizer_agreement_llama_cpp"] == report["tokenizer_agreement_transformers"] == 1.0
