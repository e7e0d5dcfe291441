"""A trained run, loaded back and asked questions: notebook 04's stop check and notebook 05's evaluation.

Both the training and the evaluation code generate answers; this module is the one place that loads a run
(base model as trained + adapter), knows its stop tokens and generates in left-padded batches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from peft import PeftModel
from tqdm import tqdm  # plain text bar: renders the same in JupyterLab, papermill and a terminal
from transformers import AutoTokenizer

from utils.data import apply_system_prompt
from utils.device import default_device, torch_dtype
from utils.files import read_json
from utils.modeling import load_model
from utils.paths import ADAPTER_DIR, CONFIG_FILE, RUNS_DIR, resolve_path


class AdapterNotFoundError(FileNotFoundError):
    """A run folder without a finished training run; ``missing`` lists the absent files."""

    def __init__(self, message: str, missing: list[Path]):
        super().__init__(message)
        self.missing = missing


def require_run(run: str | Path) -> Path:
    """The run folder if it holds a finished training run, else one error saying how to produce it."""
    run = resolve_path(run)
    needed = [run / ADAPTER_DIR / "adapter_config.json", run / ADAPTER_DIR / "adapter_model.safetensors",
              run / CONFIG_FILE]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        hint = (f"python -m utils.runner --profile {run.name} --only 04" if run.parent == RUNS_DIR
                else "notebook 04 or `python -m utils.training`")
        names = ", ".join(str(p.relative_to(run)) for p in missing)
        raise AdapterNotFoundError(f"{run} holds no finished training run (missing {names}). Run {hint} first.",
                                   missing)
    return run


def read_run_config(run: Path) -> dict:
    """A finished run's ``04_config.json``, or one error saying it is damaged and how to get a good one."""
    try:
        return read_json(run / CONFIG_FILE)
    except ValueError as exc:  # cut off or hand-edited JSON
        raise AdapterNotFoundError(
            f"{run / CONFIG_FILE} is not valid JSON ({exc}); it was cut off or edited. Run notebook 04 again "
            "(the run before it is kept in previous/).", [run / CONFIG_FILE]
        ) from None


def load_trained(run: str | Path, device: str | torch.device | None = None):
    """Base model loaded as in training (same model, quantisation, compute dtype) + the saved adapter.

    Returns ``(model, tokenizer)`` in eval mode; the tokenizer is the one saved with the adapter.
    On a machine without CUDA a run trained in fp16/bf16 is loaded with fp32 compute.
    """
    run = require_run(run)
    config = read_run_config(run)
    device = torch.device(device) if device is not None else default_device()
    compute = config["compute_dtype"] if device.type == "cuda" else "fp32"
    model = load_model(config["model_name"], quantization=config["quantization"], device=device,
                       compute_dtype=torch_dtype(compute))
    model = PeftModel.from_pretrained(model, run / ADAPTER_DIR)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(run / ADAPTER_DIR)
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def prompt_of(record: dict, system_prompt: str | None = None) -> list[dict]:
    """The chat a model answers: every turn of the record but the final assistant one.

    ``system_prompt`` (the dataset's, ``utils.data.system_prompt_policy``) opens a chat that has no system
    turn, so the model is not asked under its chat template's hidden default prompt.
    """
    if system_prompt is not None:
        [record], _ = apply_system_prompt([record], system_prompt)
    messages = list(record["messages"])
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def with_system_prompt(chats: Sequence[Sequence[dict]], system_prompt: str | None = None
                       ) -> tuple[list[list[dict]], list[str]]:
    """Chats where each one without a system turn gets ``system_prompt``, and a note saying how many did.

    ``system_prompt`` is the dataset's (``utils.data.system_prompt_policy``, as training applies it); without
    one the chats are asked as they are.
    """
    if system_prompt is None:
        return [list(chat) for chat in chats], []
    records = [{"id": k, "messages": list(chat)} for k, chat in enumerate(chats)]
    applied, notes = apply_system_prompt(records, system_prompt)
    return [r["messages"] for r in applied], notes


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Pad on the left while generating (answers then start at the same column), restore after."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def adapter_state(model, enabled: bool):
    """Context in which ``model`` answers with (``enabled``) or without its LoRA adapter."""
    if enabled:
        return contextlib.nullcontext()
    if not hasattr(model, "disable_adapter"):
        raise TypeError("the base answers need a PEFT model (with disable_adapter()); got a plain model")
    return model.disable_adapter()


def model_device(model) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device


def _decode_new(tokenizer, ids: list[int], stops: list[int], max_new_tokens: int) -> dict[str, Any]:
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    kept = ids[:end] if end is not None else ids[:max_new_tokens]
    return {"answer": tokenizer.decode(kept, skip_special_tokens=True).strip(), "n_tokens": len(kept),
            "stopped": end is not None}


def generate_answers(
    model,
    tokenizer,
    chats: Sequence[Sequence[dict]],
    max_new_tokens: int,
    batch_size: int = 8,
    adapter: bool = True,
    desc: str | None = None,
    progress: bool = True,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers to ``chats`` in left-padded batches; one dict per chat, in input order.

    Each dict: ``answer`` (decoded, special tokens dropped), ``n_tokens`` (generated before the stop
    token) and ``stopped`` (a stop token came before ``max_new_tokens``). With ``system_prompt`` (the dataset's), a
    chat without a system turn is asked under it rather than the template's hidden default (a note says how many).
    """
    chats, notes = with_system_prompt(chats, system_prompt)
    for note in notes:
        print(f"note: {note}")
    stops = stop_token_ids(model, tokenizer)
    prompts = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in chats]
    # Longest first, so each batch holds prompts of similar length (little padding).
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    device = model_device(model)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="preg.")
    was_training = model.training
    model.eval()
    try:
        with left_padding(tokenizer), adapter_state(model, adapter), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                # The chat template already holds any BOS: the tokenizer must not add a second one.
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
                for i, ids in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist()):
                    results[i] = _decode_new(tokenizer, ids, stops, max_new_tokens)
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]
