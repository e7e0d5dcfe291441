"""The one Spanish label map: every internal id a reader could see in a figure or a table, by its human name.

``label("no_prepare_gc")`` → ``"sin prepare, con checkpointing"``. An id that is not here (a student's own topic)
falls back to a humanised key: ``"becas_estudiantiles"`` → ``"Becas estudiantiles"``. Ids that mean different things
in two chapters are namespaced: ``label("modules:attention")`` (the LoRA target modules) vs
``label("tensor:attention")`` (a kind of weight tensor). Chapter owners send their new keys to H-fig.
"""

from __future__ import annotations

import re

# Storage formats of the weights (notebook 02; ``utils.memory.analytic.FORMATS``)
FORMATS = {
    "fp32": "fp32",
    "fp16": "fp16",
    "bf16": "bf16",
    "int8": "int8 (LLM.int8)",
    "fp4": "FP4",
    "nf4": "NF4",
    "nf4_dq": "NF4 + doble cuant.",
}

# Training variants of notebook 02 and its GPU report's configurations (``utils.memory.gpu_report``)
VARIANTS = {
    "prepare": "con prepare",
    "no_prepare": "sin prepare ni checkpointing",
    "no_prepare_gc": "sin prepare, con checkpointing",
    "qlora_fp16_prepare": "QLoRA fp16, con prepare (original)",
    "qlora_bf16_prepare": "QLoRA bf16, con prepare",
    "qlora_fp16_no_prepare_gc": "QLoRA fp16, sin prepare, con checkpointing",
    "qlora_bf16_no_prepare_gc": "QLoRA bf16, sin prepare, con checkpointing",
    "qlora_fp16_no_prepare": "QLoRA fp16, sin prepare ni checkpointing",
    "lora_fp16_weights_gc": "LoRA sobre pesos fp16, con checkpointing",
    "lora_fp32_weights_gc": "LoRA sobre pesos fp32, con checkpointing",
}

# Question kinds of the corpus (``kind`` field) and its splits
KINDS = {"fact": "hecho simple", "combined": "combinada", "out_of_scope": "fuera de alcance"}
SPLITS = {"train": "entrenamiento", "validation": "validación", "test": "prueba"}

# Topics of dataset/sources/utn_qa.yaml (``topic`` field)
TOPICS = {
    "reglamento_grado": "Reglamento de grado",
    "reglamento_anterior": "Reglamento anterior (Ord. 908)",
    "carreras_cortas": "Carreras cortas",
    "inspt": "INSPT",
    "equivalencias": "Equivalencias",
    "mesas_especiales": "Mesas especiales",
    "diplomas_identidad": "Diplomas e identidad",
    "examenes_fr": "Exámenes en la facultad regional",
    "protocolo_genero": "Protocolo de género",
    "practica_supervisada": "Práctica supervisada",
    "fuera_de_alcance": "Fuera de alcance",
}

# Models and profiles (the ``model_name`` and ``profile`` parameters)
MODELS = {
    "embedded": "SmolLM2-135M-Instruct (embebido)",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct",
    "unsloth/Llama-3.2-3B-Instruct": "Llama-3.2-3B-Instruct",
    "meta-llama/Llama-3.2-3B-Instruct": "Llama-3.2-3B-Instruct",
    "twin": "gemelo de Llama-3.2-3B (pesos aleatorios)",
    "tiny_twin": "gemelo mínimo (prueba de lógica)",
    "base": "Base",
    "tuned": "Ajustado (LoRA)",
    "reference": "Referencia",
    "llama-3.2-3b-twin": "gemelo de Llama-3.2-3B (pesos aleatorios)",
    # The systems of notebook 05 (utils.evaluation.baselines)
    "base_rag": "Base + BM25",
    "tuned_rag": "Ajustado + BM25",
    "few_shot": "Base con ejemplos",
}
PROFILES = {"smoke": "prueba rápida", "demo": "demostración", "thesis": "tesis", "gpu": "GPU, receta de la tesis",
            "gpu-tuned": "GPU, receta elegida en validación", "thesis-twin": "gemelo de la tesis (pesos aleatorios)"}

# Namespaced ids (the same word means different things in two chapters)
NAMESPACED = {
    "modules:attention": "solo atención (q, k, v, o)",
    "modules:mlp": "solo MLP (gate, up, down)",
    "modules:all": "los siete módulos (original)",
    "modules:q_v": "solo q y v (LoRA original)",
    "tensor:embedding": "embeddings",
    "tensor:attention": "atención (q, k, v, o)",
    "tensor:mlp": "MLP (gate, up, down)",
    "tensor:norms": "normas RMS",
    "tensor:lm_head": "lm_head (sin atar)",
    "group:original": "configuración original",
    "group:recipe": "receta original (2 secuencias por paso), acelerada",
    "group:throughput": "camino rápido, micro-lote grande",
    "group:ablation": "ablaciones",
    "group:corpus": "ejemplos reales del corpus",
    "group:peer": "Unsloth (referencia)",
    "sampler:random": "orden aleatorio (corregido)",
    "sampler:group_by_length": "agrupado por longitud (original)",
    "curve:train": "entrenamiento",
    "curve:validation": "validación",
    "curve:best": "mínimo de validación",
}

# Pieces of the speed benchmark's configuration ids (``utils.speed.benchmark.configs``), composed below
_SPEED_WORDS = {
    "hf": "Hugging Face", "fast": "camino rápido", "unsloth": "Unsloth", "noprep": "sin prepare",
    "liger": "Liger", "on_gpu": "puntos de control en la GPU", "torch_kernels": "núcleos de PyTorch",
    "per_tensor_optim": "optimizador por tensor", "fused_adamw": "AdamW fusionado",
    "keep_down": "recalcula down_proj", "no_offload": "sin descarga a la CPU", "dropout0": "sin dropout",
    "keep_input": "solo la entrada como punto de control", "keep_mid": "entrada y residual como puntos de control",
    "mlp8k": "MLP en trozos de 8.192 tokens", "corpus": "corpus real", "graphs": "grafos CUDA",
    "unfused_lora": "LoRA sin fusionar", "varlen": "FlashAttention varlen", "cublaslt": "cuBLASLt",
    "exact_pin": "memoria fijada a medida", "mid14": "residual como punto de control en 14 capas",
    "mid10": "residual como punto de control en 10 capas",
    "midqkv5": "residual y q/k/v como puntos de control en 5 capas",
}
SPEED_IDS = (
    "original_fp16", "original_bf16", "hf_2x1_fp16", "hf_2x1_noprep_liger_bf16", "fast_2x1_fp16", "fast_2x1_bf16",
    "fast_2x1_on_gpu_fp16", "fast_2x1_torch_kernels_fp16", "fast_2x1_per_tensor_optim_fp16",
    "fast_2x1_fused_adamw_fp16", "fast_mb16_bf16", "fast_mb32_bf16", "fast_mb40_bf16", "fast_mb48_bf16",
    "fast_mb32_per_tensor_optim_bf16", "fast_mb32_fused_adamw_bf16", "fast_mb32_fp16", "fast_mb48_fp16",
    "fast_mb32_keep_down_bf16", "fast_mb32_no_offload_bf16", "fast_mb32_torch_kernels_bf16",
    "fast_mb32_dropout0_bf16", "fast_mb32_dropout0_fp16", "fast_mb32_dropout0_keep_input_bf16",
    "fast_mb32_dropout0_keep_mid_bf16", "fast_mb32_dropout0_keep_mid_fp16", "fast_mb32_dropout0_mlp8k_bf16",
    "fast_mb40_dropout0_bf16", "fast_mb40_dropout0_mlp8k_bf16", "fast_mb48_dropout0_mlp8k_bf16",
    "fast_mb40_dropout0_fp16", "hf_mb16_noprep_liger_bf16", "original_corpus_fp16", "fast_2x1_corpus_fp16",
    "fast_mb32_corpus_bf16", "fast_mb32_corpus_fp16", "unsloth_2x1_bf16", "unsloth_mb32_bf16", "unsloth_mb40_bf16",
    "unsloth_mb48_bf16", "unsloth_mb32_fp16", "unsloth_mb40_fp16", "fast_mb32_keep_input_bf16",
    "fast_mb32_keep_input_fp16", "fast_mb40_keep_input_bf16", "fast_mb40_keep_input_fp16", "fast_mb20_keep_mid_bf16",
    "fast_mb16_no_offload_bf16", "fast_mb32_keep_input_cublaslt_fp16", "fast_mb32_keep_input_cublaslt_bf16",
    "fast_mb36_keep_input_bf16", "fast_mb36_keep_input_fp16", "unsloth_mb36_bf16", "unsloth_mb36_fp16",
    "fast_2x1_graphs_fp16", "fast_mb32_keep_input_unfused_lora_bf16", "fast_mb32_keep_input_varlen_bf16",
    "fast_mb32_keep_input_varlen_fp16", "fast_2x1_graphs_corpus_fp16", "fast_mb32_keep_input_exact_pin_fp16",
    "fast_mb32_mid14_exact_pin_fp16", "fast_mb32_mid14_exact_pin_bf16", "fast_mb32_midqkv5_exact_pin_fp16",
    "fast_mb36_mid10_exact_pin_fp16", "fast_mb36_mid10_exact_pin_bf16",
)


def compose_speed_label(config_id: str) -> str:
    """A speed configuration's id in words: ``fast_mb32_dropout0_bf16`` → "camino rápido, micro-lote 32, …"."""
    rest, _, dtype = config_id.rpartition("_")
    if rest.startswith("original"):
        parts = ["configuración original"] + (["corpus real"] if "corpus" in rest else [])
        return ", ".join(parts + [dtype])
    impl, _, rest = rest.partition("_")
    parts = [_SPEED_WORDS[impl]]
    batch = re.match(r"(2x1|mb(\d+))_?", rest)
    if batch:
        parts.append("2 × 1 secuencias" if batch.group(1) == "2x1" else f"micro-lote {batch.group(2)}")
        rest = rest[batch.end():]
    found = [(m.start(), word) for word in _SPEED_WORDS for m in re.finditer(rf"(?<![a-z0-9]){word}(?![a-z0-9])", rest)]
    parts += [_SPEED_WORDS[word] for _, word in sorted(found)]
    return ", ".join(parts + [dtype])


SPEED = {config_id: compose_speed_label(config_id) for config_id in SPEED_IDS}

LABELS: dict[str, str] = {**FORMATS, **VARIANTS, **KINDS, **SPLITS, **TOPICS, **MODELS, **PROFILES, **NAMESPACED,
                          **SPEED}


def humanize(key: str) -> str:
    """An unknown id as words: ``"becas_estudiantiles"`` → ``"Becas estudiantiles"``."""
    key = key.rpartition(":")[2] if ":" in key else key
    key = key.rstrip("/").rpartition("/")[2] or key  # a model's folder or hub id: its last part, no home path
    text = re.sub(r"[_\s]+", " ", key).strip()
    return text[:1].upper() + text[1:] if text else key


def label(key: str) -> str:
    """The Spanish human name of an internal id (a format, variant, kind, topic, split, model, profile…)."""
    return LABELS.get(key) or humanize(str(key))
