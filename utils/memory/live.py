"""What a notebook can measure live here: the profile's weights may be missing (notebooks 02 and 03).

Without them, the Llama-3.2-3B twin's architecture on the ``meta`` device stands in for every step that needs
no weights, the committed GPU report for what was measured on a GPU, and the weight-needing steps are
skipped, each saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import AutoConfig

from utils.config import THESIS
from utils.device import dtype_name, pick_compute_dtype
from utils.memory.analytic import config_dict
from utils.memory.loading import load_model_config
from utils.memory.tables import load_gpu_report
from utils.modeling import TWIN, ModelNotAvailableError, model_folder, resolve_model, twin_config
from utils.paths import REPO_ROOT, TWIN_CONFIG_FILE, resolve_path

DEFAULT_GPU_RESULTS = "results/02_twin_gpu_memory.json"
# Repository names with the Llama-3.2-3B architecture (unsloth's pre-quantised uploads included): when their
# weights are missing, the twin (utils/assets/llama-3.2-3b-config.json) gives the same architecture.
TWIN_NAME_PATTERN = r"llama-3\.2-3b(-instruct)?(-unsloth)?(-bnb-4bit)?"
EMBEDDED_STAND_IN = "embedded"

# Per notebook: what runs without weights on the twin, what comes from the committed GPU report, what needs the
# real weights and is skipped, and the one cheap step that runs on the embedded model as a labelled stand-in.
FALLBACK_PLANS: dict[str, dict[str, Any]] = {
    "02": {
        "live": ["los parámetros por tipo de tensor (sección 1)",
                 "el tamaño analítico exacto de los pesos en cada formato (sección 2)",
                 "el desglose analítico de un paso de entrenamiento (sección 7)"],
        "committed": "la memoria de los pesos cargados en cada formato y el pico de un paso de entrenamiento "
                     "(sección 7 y la figura)",
        "skipped": ["la memoria medida al cargar cada formato (sección 3)",
                    "el error de cuantización de los pesos reales (sección 4)",
                    "la pérdida y la perplejidad en el conjunto de prueba (sección 5)",
                    "el paso de entrenamiento medido en este dispositivo (sección 6)"],
        "stand_in": None,
    },
    "03": {
        "live": ["LoRA enganchada al gemelo con la configuración del perfil: conteos por módulo, por capa y "
                 "totales (secciones 1 y 3)", "el árbol de módulos de una capa (sección 2)",
                 "el barrido de r y de módulos, con el tamaño del adaptador medido materializando solo los "
                 "tensores LoRA (sección 4)", "las afirmaciones del análisis original (sección 5)"],
        "committed": "la memoria de un paso de entrenamiento que usa la tabla de afirmaciones (sección 5)",
        "skipped": ["la carga del modelo en 4 bits (sección 1): el gemelo en `meta` está en bf16, así que no hay "
                    "tensores de 4 bits y la suma de `numel()` coincide con la de PEFT"],
        "stand_in": "la comprobación de que el adaptador arranca siendo la identidad (B = 0, logits iguales; "
                    "sección 2) corre sobre SmolLM2-135M-Instruct (embebido), cargado y adaptado como el original: "
                    "es una propiedad de la inicialización de PEFT, no de los valores de los pesos",
    },
}


@dataclass
class LiveModel:
    """What this machine can measure of the profile's model (see ``resolve_live_model``)."""

    model_name: str
    available: bool  # its weights load here: every step runs on them
    config: Any  # its architecture (the Llama-3.2-3B twin's when the weights are missing)
    label: str  # how tables and figures name the model the architecture steps ran on
    reason: str | None = None  # ModelNotAvailableError's message, which says how to get the weights
    note: str = ""  # Spanish markdown the notebook shows once when the weights are missing
    stand_in: str | None = None  # model a cheap weight-needing step runs on instead, when the plan names one
    skipped_steps: dict[str, str] = field(default_factory=dict)

    @property
    def weights_name(self) -> str | None:
        """Model whose weights the weight-needing steps use: the profile's, the stand-in, or None (skip)."""
        return self.model_name if self.available else self.stand_in

    def unquantized_dtype(self, device: str) -> tuple[str, str]:
        """dtype bitsandbytes leaves embeddings and norms in, and why: the load dtype here, or the thesis GPU's."""
        if self.available:
            return dtype_name(pick_compute_dtype(device)), f"el dtype de carga en {device}"
        return THESIS.bnb_4bit_compute_dtype, "el dtype de cómputo del script original en la RTX 2070 SUPER; aquí no se carga nada"

    def skip(self, step: str, out_dir: Path | None = None, outputs: Sequence[str] = ()) -> str:
        """Record that ``step`` did not run, delete its outputs left by an earlier run, return the line to print."""
        reason = f"no hay pesos reales de {self.model_name} en esta máquina; ver la nota del principio"
        self.skipped_steps[step] = reason
        stale = [name for name in outputs if out_dir is not None and (Path(out_dir) / name).exists()]
        for name in stale:
            (Path(out_dir) / name).unlink()
        return f"Se omite {step}: {reason}." + (f" Se borró lo que dejó una corrida anterior: {', '.join(stale)}."
                                                if stale else "")

    def as_record(self) -> dict[str, Any]:
        """What the run record keeps: whether the weights were live, why not, what was skipped or stood in."""
        return {"model_name": self.model_name, "available": self.available, "label": self.label,
                "reason": self.reason, "stand_in": self.stand_in, "skipped_steps": dict(self.skipped_steps)}


def has_twin_architecture(name: str) -> bool:
    """Whether ``name`` is Llama-3.2-3B: the twin, a folder whose ``config.json`` equals the twin's, or a hub id
    named so."""
    if name == TWIN:
        return True
    path = resolve_path(name)
    if (path / "config.json").is_file():
        return config_dict(AutoConfig.from_pretrained(path)) == config_dict(twin_config())
    return re.fullmatch(TWIN_NAME_PATTERN, name.rstrip("/").split("/")[-1].lower()) is not None


def _check_weights(model_name: str) -> None:
    """Raise ``ModelNotAvailableError`` unless the weights of ``model_name`` are on this machine.

    The twin's random weights are written here on first use (``utils.modeling.materialize_twin``); without the
    disk space for them it falls back like a missing Llama-3.2-3B.
    """
    folder = model_folder(model_name)
    if not any(folder.glob("*.safetensors")):
        raise ModelNotAvailableError(
            f"{folder} holds no *.safetensors weights. Download them with `hf download <repo> "
            f"--local-dir {folder}`, or set model_name='embedded'."
        )


def resolve_live_model(model_name: str, notebook: str, gpu_results_file: str | Path = DEFAULT_GPU_RESULTS
                       ) -> LiveModel:
    """Whether the profile's weights load here; if not, what notebook ``notebook`` shows instead.

    Loads no weights: it finds the weights folder (``utils.modeling.model_folder``, offline-aware) and reads
    the config. When that raises ``ModelNotAvailableError`` for a Llama-3.2-3B name, the notebook falls back to
    the twin's architecture on the ``meta`` device plus the committed GPU report, and ``note`` says so (with the
    error's advice on getting the weights). A name that is not a model at all, or a missing model of another
    architecture, still raises: nothing else can stand in for it honestly.
    """
    if notebook not in FALLBACK_PLANS:
        raise ValueError(f"notebook={notebook!r}: the fallback plans cover {sorted(FALLBACK_PLANS)}")
    spec = resolve_model(model_name)  # a malformed name is the user's error, not a missing model
    try:
        _check_weights(model_name)
        return LiveModel(model_name, True, load_model_config(model_name), spec.label)
    except ModelNotAvailableError as exc:
        reason = str(exc)
    if not has_twin_architecture(model_name):
        raise ModelNotAvailableError(
            f"{reason} (Only Llama-3.2-3B has a weightless stand-in here, its twin; {model_name!r} is another "
            "architecture, so notebooks 02 and 03 need its weights.)"
        )
    plan = FALLBACK_PLANS[notebook]
    gpu = load_gpu_report(gpu_results_file)
    live = LiveModel(model_name, False, twin_config(), "Llama-3.2-3B (gemelo en meta, sin pesos)", reason,
                     stand_in=EMBEDDED_STAND_IN if plan["stand_in"] else None)
    live.note = fallback_note(live, plan, gpu, gpu_results_file)
    return live


def fallback_note(live: LiveModel, plan: dict, gpu: dict, gpu_results_file: str | Path) -> str:
    """The one Spanish note a notebook shows when the profile's weights are missing."""
    lines = [
        f"**Los pesos reales de `{live.model_name}` no están disponibles en esta máquina.** Motivo y cómo "
        "conseguirlos:",
        "",
        f"> {live.reason}",
        "",
        "Qué muestra este cuaderno en su lugar (cada tabla y figura dice sobre qué modelo se calculó):",
        "",
        f"- **Calculado aquí, sin pesos**, sobre el gemelo de Llama-3.2-3B (la arquitectura exacta, "
        f"`{TWIN_CONFIG_FILE.relative_to(REPO_ROOT)}`) construido en el dispositivo `meta` (solo formas): "
        + "; ".join(plan["live"]) + ".",
        f"- **Medido en GPU, no aquí**: {plan['committed']}, de `{gpu_results_file}`: {gpu.get('label')}, "
        f"medido en {gpu.get('device')} el {str(gpu.get('date', ''))[:10]}.",
        "- **Se omite** (necesita los pesos reales): " + "; ".join(plan["skipped"]) + ". Con el modelo incluido "
        "estos pasos corren en los perfiles `smoke` y `demo` (`runs/demo/`).",
    ]
    if plan["stand_in"]:
        lines.append(f"- **Sustituto, rotulado como tal**: {plan['stand_in']}.")
    return "\n".join(lines)
