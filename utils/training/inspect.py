"""The traps made visible, as tables: labels, BOS per example, settings, parameter counts, stop rates.

Which tokens carry loss, how many BOS each tokenisation gives, this run's settings against the original
script's, PEFT's own parameter counts, and whether the trained model learnt to stop (base against tuned).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from utils.config import THESIS
from utils.data import load_records, system_prompt_policy, to_text_dataset
from utils.inference import generate_answers, prompt_of
from utils.memory import load_model_config
from utils.modeling import build_lora_config, build_twin, load_tokenizer, resolve_model
from utils.training.data import sample_records, strip_template_bos
from utils.training.settings import TrainingPlan, TrainingSettings


def label_table(trainer, tokenizer, index: int = 0) -> pd.DataFrame:
    """One training example token by token: its id, the token, and whether it carries loss."""
    example = trainer.train_dataset[index]
    batch = trainer.data_collator([example])  # labels exactly as the loss sees them
    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    return pd.DataFrame({
        "posición": range(len(ids)),
        "id": ids,
        "token": [tokenizer.decode([i]) for i in ids],
        "con_pérdida": [label != -100 for label in labels],
    })


def describe_labels(table: pd.DataFrame, tokenizer) -> dict[str, Any]:
    """What a label table shows: text with and without loss, and whether EOS/pad carry loss."""
    trained = table[table["con_pérdida"]]
    masked = table[~table["con_pérdida"]]
    eos_rows = table[table["id"] == tokenizer.eos_token_id]
    return {
        "tokens": len(table),
        "tokens_con_pérdida": len(trained),
        # decoded as runs of ids: a character split across tokens decodes whole
        "texto_con_pérdida": tokenizer.decode(trained["id"].tolist()),
        "texto_enmascarado": tokenizer.decode(masked["id"].tolist()),
        "eos_en_el_ejemplo": len(eos_rows),
        "eos_con_pérdida": int(eos_rows["con_pérdida"].sum()),
        # the EOS that closes the answer: the one the model must learn to emit
        "eos_final_con_pérdida": bool(len(eos_rows)) and bool(eos_rows["con_pérdida"].iloc[-1]),
        "bos": int((table["id"] == tokenizer.bos_token_id).sum()),
        "pad_es_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
    }


def double_bos_table(records: list[dict], tokenizer_name: str = "llama-3.2") -> pd.DataFrame:
    """BOS count of one example with the Llama-3.2 tokenizer, the way each pipeline tokenises it."""
    tokenizer = load_tokenizer(tokenizer_name)
    bos = tokenizer.bos_token_id
    messages = records[0]["messages"]
    text = to_text_dataset(records[:1], tokenizer)[0]["text"]
    stripped = strip_template_bos(to_text_dataset(records[:1], tokenizer), tokenizer)[0]["text"]
    chat = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    rows = [
        ("texto de la plantilla + tokenizer(text) (script original)", tokenizer(text)["input_ids"]),
        ("texto sin el BOS de la plantilla + tokenizer(text) (replicate_original)", tokenizer(stripped)["input_ids"]),
        ("prompt–completion: apply_chat_template (corregido)", chat),
    ]
    return pd.DataFrame(
        [{"tokenización": name, "BOS": ids.count(bos), "primeros tokens": tokenizer.convert_ids_to_tokens(ids[:3])}
         for name, ids in rows]
    )


def trainable_parameter_counts(model_name: str = "llama-3.2-3b-twin", r: int = THESIS.lora_r) -> dict[str, Any]:
    """PEFT's own count of trainable and total parameters with the thesis LoRA (shapes only, no memory)."""
    if resolve_model(model_name).is_twin:
        model = build_twin("meta")
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_model_config(model_name))
    peft_model = get_peft_model(model, build_lora_config(r=r))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"modelo": model_name, "r": r, "entrenables": trainable, "totales": total,
            "porcentaje": round(100 * trainable / total, 3)}


def settings_table(settings: TrainingSettings, plan: TrainingPlan) -> pd.DataFrame:
    """Each setting: the original script's value, this run's value, and what it resolved to."""
    original = TrainingSettings()
    resolved = {
        "quantization": plan.quantization or "sin cuantizar",
        "compute_dtype": plan.compute_dtype,
        "optim": plan.optim,
        "replicate_original": f"pérdida {plan.loss}, pad = eos: {plan.pad_is_eos}, muestreo "
                              f"{plan.train_sampling_strategy}, upcast: {plan.kbit_upcast}",
        "resume": plan.resume_from or "desde el paso 0",
        "output_dir": plan.output_dir,
    }
    rows = []
    for f in dataclasses.fields(TrainingSettings):
        mine, theirs = getattr(settings, f.name), getattr(original, f.name)
        rows.append({"parámetro": f.name, "script original": theirs, "esta corrida": mine,
                     "resuelto": resolved.get(f.name, ""), "difiere": "≠" if mine != theirs else ""})
    return pd.DataFrame(rows).set_index("parámetro")


# --------------------------------------------------------------------------------------------
# Does the model stop? Greedy generations that end with EOS before max_new_tokens
# --------------------------------------------------------------------------------------------


def stop_rate_records(settings: TrainingSettings, n: int) -> list[dict]:
    """A seeded sample of ``n`` validation records (all when ``n`` is 0) for the stop-rate measurement."""
    return sample_records(load_records(settings.validation_file), n, settings.seed)


def answers_table(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 8,
                  adapter: bool = True) -> pd.DataFrame:
    """Greedy answers to the records' questions (``utils.inference.generate_answers``), one row per record:
    did it stop, new tokens, the answer."""
    answers = generate_answers(model, tokenizer, [prompt_of(r) for r in records], max_new_tokens,
                               batch_size=batch_size, adapter=adapter, progress=False,
                               system_prompt=system_prompt_policy(records))
    return pd.DataFrame([
        {"id": r.get("id"), "termina": a["stopped"], "tokens_nuevos": a["n_tokens"], "respuesta": a["answer"]}
        for r, a in zip(records, answers)
    ])


def compare_stop_rates(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 8):
    """Stop rate of the base model (adapter off) and the tuned model on the same questions.

    Returns ``(summary, base_answers, tuned_answers)``.
    """
    base = answers_table(model, tokenizer, records, max_new_tokens, batch_size, adapter=False)
    tuned = answers_table(model, tokenizer, records, max_new_tokens, batch_size, adapter=True)
    summary = pd.DataFrame([
        {"modelo": name, "preguntas": len(df), "terminan_con_eos": int(df["termina"].sum()),
         "tasa_de_corte": round(float(df["termina"].mean()), 3) if len(df) else float("nan"),
         "tokens_nuevos_mediana": float(df["tokens_nuevos"].median()) if len(df) else float("nan"),
         "max_new_tokens": max_new_tokens}
        for name, df in (("base", base), ("ajustado", tuned))
    ])
    return summary, base, tuned
