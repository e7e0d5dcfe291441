"""GGUF export of a merged Llama model for llama.cpp and Ollama, and its Ollama ``Modelfile``.

The file follows llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM`` (tensor names from gguf-py's own
map, the q/k row permutation, the hyper-parameters, ``rope_freqs`` for Llama-3 rope scaling, the GPT-2 BPE
tokenizer with its ``tokenizer.ggml.pre`` found by llama.cpp's hash of a reference text), written with the
``gguf`` package (gguf-py, the same code llama.cpp's converter uses). The round trip that checks a written
file by loading it back with transformers is ``utils.evaluation.export.roundtrip_check``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from utils.evaluation.gguf_read import PRE_TOKENIZER_CHECK_TEXT, PRE_TOKENIZERS, GGUFExportError, llama_cpp_tokenizer
from utils.files import atomic_write_text, save_json
from utils.provenance import result_provenance
from utils.units import GIB

EXPORT_REPORT_FILE = "05_gguf_export.json"
MODELFILE = "Modelfile"

# type name -> (how 2-D weights are stored, llama.cpp's general.file_type)
GGUF_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# The chat layouts this project trains with: (opening, closing) text around each turn's content. The assistant turn
# opens with the generation prompt. A template may add a fixed preamble to the system turn (Meta's Llama-3.x
# template writes "Cutting Knowledge Date: ..." and "Today Date: ..." there), which chat_layout() reads off the
# template itself.
CHAT_FORMATS: dict[str, dict[str, Any]] = {
    "llama3": {
        "marker": "<|start_header_id|>",
        "system": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        "user": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        "assistant": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        # what Llama-3.x Instruct's generation_config.json lists as eos_token_id
        "stops": ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    },
    "chatml": {
        "marker": "<|im_start|>",
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
        "stops": ("<|im_end|>",),
    },
}




# --------------------------------------------------------------------------------------------
# Reading the merged folder
# --------------------------------------------------------------------------------------------


def read_llama_config(merged_dir: Path) -> dict[str, Any]:
    """``config.json`` of a merged folder, refused unless it is a Llama (the only layout written here)."""
    path = Path(merged_dir) / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{path} does not exist: point merged_dir at the folder export_merged() wrote "
                              "(runs/<profile>/05_merged), which holds config.json and the safetensors weights.")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise GGUFExportError(f"{path}: model_type={config.get('model_type')!r}; this exporter writes Llama models "
                              "only. Use llama.cpp's convert_hf_to_gguf.py for other architectures.")
    return config


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings in transformers 5 form (``rope_parameters``), also from a 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def head_dim_of(config: dict[str, Any]) -> int:
    """Width of one attention head."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp writes for ``rope_type="llama3"`` (one divisor per frequency)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    # llama.cpp reads original_max_position_embeddings at the top of config.json (default 8192); transformers
    # keeps it in the rope parameters. Llama 3.x has 8192 in both places.
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def pre_tokenizer_of(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (``llama-bpe``, ``smollm``), found by its hash."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise GGUFExportError(
            f"the tokenizer's pre-tokenizer is not one this exporter knows (hash {digest}; known: "
            f"{sorted(PRE_TOKENIZERS.values())}). Convert this model with llama.cpp's convert_hf_to_gguf.py, "
            "whose table covers many more tokenizers."
        )
    return PRE_TOKENIZERS[digest]


def chat_format_of(chat_template: str | None, where: str) -> str:
    """``"llama3"`` or ``"chatml"``: the chat layout a Jinja chat template writes."""
    for name, spec in CHAT_FORMATS.items():
        if chat_template and spec["marker"] in chat_template:
            return name
    raise GGUFExportError(f"{where}: the chat template is neither Llama-3 (<|start_header_id|>) nor ChatML "
                          "(<|im_start|>); write the Ollama TEMPLATE for it by hand.")


def render_layout(layout: dict[str, Any], system: str, messages: Sequence[dict]) -> str:
    """A chat as the Ollama template of ``layout`` renders it (system from SYSTEM, then user/assistant turns)."""
    text = "".join([layout["system"][0], system, layout["system"][1]]) if system else ""
    for message in messages:
        if message["role"] == "user":
            text += layout["user"][0] + message["content"] + layout["user"][1] + layout["assistant"][0]
        elif message["role"] == "assistant":
            text += message["content"] + layout["assistant"][1]
    return text


def chat_layout(tokenizer, where: str) -> dict[str, Any]:
    """The turn layout of the tokenizer's chat template, checked by rendering a three-turn chat with it."""
    family = chat_format_of(tokenizer.chat_template, where)
    layout = dict(CHAT_FORMATS[family], family=family)
    probe = [{"role": "system", "content": "SYSTEM_7C1"}, {"role": "user", "content": "USER_7C1"},
             {"role": "assistant", "content": "ASSISTANT_7C1"}, {"role": "user", "content": "USER_7C2"}]
    rendered = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    if tokenizer.bos_token and rendered.startswith(tokenizer.bos_token) and bos_added(tokenizer):
        rendered = rendered[len(tokenizer.bos_token):]  # llama.cpp adds it to the prompt, the template must not
    if rendered.startswith(layout["system"][0]) and "SYSTEM_7C1" in rendered:  # the opening with any preamble
        layout["system"] = (rendered[: rendered.index("SYSTEM_7C1")], layout["system"][1])
    if render_layout(layout, "SYSTEM_7C1", probe[1:]) != rendered:
        raise GGUFExportError(f"{where}: the chat template lays out turns differently from the {family} layout "
                              f"({rendered!r}); write the Ollama TEMPLATE for it by hand.")
    return layout


def go_template(layout: dict[str, Any]) -> str:
    """The Ollama (Go text/template) form of ``render_layout``: system from .System, then the user and assistant
    turns of .Messages (Ollama keeps system messages in .Messages too, so the loop skips them)."""
    (sys_open, sys_close), (user_open, user_close) = layout["system"], layout["user"]
    assistant_open, assistant_close = layout["assistant"]
    return (f"{{{{ if .System }}}}{sys_open}{{{{ .System }}}}{sys_close}{{{{ end }}}}"
            f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{user_open}{{{{ .Content }}}}{user_close}'
            f'{assistant_open}{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{assistant_close}'
            "{{ end }}{{ end }}")


def bos_added(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (then llama.cpp does too, from the GGUF's flag)."""
    return tokenizer.bos_token_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]


def vocab_of(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types, padded to ``vocab_size`` (convert_hf_to_gguf's get_vocab_base)."""
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            special = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def stop_tokens_of(merged_dir: Path, tokenizer) -> list[str]:
    """Texts of the tokens that end an answer: the tokenizer's EOS and every EOS id of ``generation_config.json``."""
    ids: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    path = Path(merged_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _safetensors_files(merged_dir: Path) -> list[Path]:
    """The weight shards of a merged folder (pickled .bin files are refused, as everywhere in the project)."""
    files = sorted(Path(merged_dir).glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{merged_dir} holds no *.safetensors weights: export the merged model with "
                              "export_merged() (save_pretrained(safe_serialization=True)) first.")
    return files


def plan_tensors(merged_dir: Path, config: dict[str, Any]) -> list[tuple[str, Path, str, tuple[int, ...]]]:
    """(GGUF name, shard, HF name, shape) of every tensor to write, in llama.cpp's names."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    plan = []
    for shard in _safetensors_files(merged_dir):
        with safe_open(str(shard), framework="pt") as handle:
            for hf_name in handle.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by every runtime / the same matrix as token_embd
                name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"{shard}: tensor {hf_name!r} has no GGUF name in a Llama model; "
                                          "is this folder really a merged LlamaForCausalLM?")
                plan.append((name, shard, hf_name, tuple(handle.get_slice(hf_name).get_shape())))
    return plan


def storage_type(name: str, shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """How llama.cpp stores a tensor in a file of ``qtype``: 1-D tensors (norms, rope factors) stay F32; a matrix
    whose rows do not split into Q8_0 blocks of 32 falls back to F16."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if qtype != gguf.GGMLQuantizationType.F16 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's row order for q/k projections: it applies rope to interleaved pairs, transformers to halves."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    """Float32 array in the stored form of ``qtype`` (Q8_0: blocks of bytes, as gguf-py and ggml write them)."""
    encoded = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
    if qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(encoded).all():
        raise GGUFExportError(f"{name} has values beyond the f16 range (±65504): export it as q8_0 instead.")
    return encoded


def load_tensor(shard: Path, hf_name: str, config: dict[str, Any]) -> np.ndarray:
    """One weight as float32, with the q/k permutation applied."""
    with safe_open(str(shard), framework="pt") as handle:
        weight = handle.get_tensor(hf_name).float()
    if hf_name.endswith("q_proj.weight"):
        weight = permute_qk(weight, config["num_attention_heads"])
    elif hf_name.endswith("k_proj.weight"):
        weight = permute_qk(weight, config["num_attention_heads"], config.get("num_key_value_heads"))
    return weight.numpy()


def _nbytes(shape: Sequence[int], stored: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...], Any, int]:
    """(shape as passed to the writer, numpy dtype, bytes) of a tensor stored as ``stored``."""
    if stored == gguf.GGMLQuantizationType.F32:
        return tuple(shape), np.float32, int(np.prod(shape)) * 4
    if stored == gguf.GGMLQuantizationType.F16:
        return tuple(shape), np.float16, int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, stored)
    return byte_shape, np.uint8, int(np.prod(byte_shape))


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict[str, Any], ftype: gguf.LlamaFileType,
                        name: str, n_params: int) -> None:
    """The ``general.*`` and ``llama.*`` keys convert_hf_to_gguf writes for a Llama model."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(ftype)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim_of(config))
    if head_dim_of(config) != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim_of(config))  # llama.cpp derives it from hidden_size otherwise
        writer.add_value_length(head_dim_of(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] not in ("default", "llama3"):
        raise GGUFExportError(f"rope_type={rope['rope_type']!r} is not written by this exporter (default, linear "
                              "and llama3 are); use llama.cpp's convert_hf_to_gguf.py.")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer: gguf.GGUFWriter, merged_dir: Path, tokenizer, vocab_size: int) -> dict[str, Any]:
    """The GPT-2 BPE tokenizer as llama.cpp's ``_set_vocab_gpt2`` writes it; returns what was decided."""
    pre = pre_tokenizer_of(tokenizer)
    tokens, types = vocab_of(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=len(tokens))
    # Whether llama.cpp puts BOS in front of a prompt: measured on the tokenizer itself rather than parsed from
    # its post-processor (SmolLM2 adds none, Llama 3 adds <|begin_of_text|>).
    add_bos = bos_added(tokenizer)
    special.add_special_token["bos"] = add_bos
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        raise GGUFExportError(f"{merged_dir} has no chat template (chat_template.jinja or tokenizer_config.json): "
                              "save the tokenizer the model was trained with next to the weights.")
    return {"pre_tokenizer": pre, "add_bos_token": add_bos, "n_merges": len(special.merges),
            "chat_format": chat_layout(tokenizer, str(merged_dir))["family"]}


def write_gguf_file(path: Path, merged_dir: Path, config: dict[str, Any], tokenizer, type_name: str,
                    name: str) -> dict[str, Any]:
    """Write one GGUF of ``type_name`` to ``path`` (tensor by tensor: memory holds one tensor at a time)."""
    qtype, ftype = GGUF_TYPES[type_name]
    plan = plan_tensors(merged_dir, config)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    n_params = sum(int(np.prod(shape)) for *_, shape in plan)
    add_hyperparameters(writer, config, ftype, name, n_params)
    info = add_tokenizer(writer, merged_dir, tokenizer, config["vocab_size"])
    rope = rope_parameters(config)
    extra = {}
    if rope["rope_type"] == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(
            rope, head_dim_of(config))
    stored = {gguf_name: storage_type(gguf_name, shape, qtype) for gguf_name, _, _, shape in plan}
    for gguf_name, factors in extra.items():
        writer.add_tensor_info(gguf_name, factors.shape, np.float32, factors.nbytes)
    for gguf_name, _, _, shape in plan:
        writer_shape, dtype, nbytes = _nbytes(shape, stored[gguf_name])
        raw = stored[gguf_name] if dtype == np.uint8 else None
        writer.add_tensor_info(gguf_name, writer_shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for factors in extra.values():
            writer.write_tensor_data(factors)
        for gguf_name, shard, hf_name, _ in plan:
            writer.write_tensor_data(encode_tensor(load_tensor(shard, hf_name, config), stored[gguf_name], hf_name))
    finally:
        writer.close()
    counts = {t.name: list(stored.values()).count(t) for t in set(stored.values())}
    return {**info, "n_params": n_params, "n_tensors": len(plan) + len(extra), "stored_types": counts,
            "rope_freqs": bool(extra)}


def _check_name(name: str) -> str:
    """A file-name-safe model name (letters, digits, '.', '_', '-')."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise GGUFExportError(f"name={name!r}: use letters, digits, '.', '_' and '-' only (it names the files).")
    return name


def gguf_targets(out_dir: Path, name: str, types: Sequence[str], overwrite: bool) -> dict[str, Path]:
    """The file of each type; refuses unknown types and, unless ``overwrite``, files that already exist."""
    types = (types,) if isinstance(types, str) else tuple(types)
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or not types:
        raise GGUFExportError(f"types={list(types)!r}: choose among {sorted(GGUF_TYPES)}.")
    targets = {t: Path(out_dir) / f"{name}-{t}.gguf" for t in dict.fromkeys(types)}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists and export_gguf never overwrites a file by default: "
                              "move it away, or call export_gguf(..., overwrite=True) to replace it.")
    return targets


def export_gguf(merged_dir: str | os.PathLike, out_dir: str | os.PathLike, types: Sequence[str] = ("f16", "q8_0"),
                *, name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``<out_dir>/<name>-<type>.gguf`` for each type from a merged Llama folder; return the report.

    ``name`` defaults to the merged folder's name (``05_merged``). Each file is written to a temporary file in
    ``out_dir`` and renamed into place when complete, so an interrupted export leaves no partial ``.gguf``.
    The report (files, sizes, seconds, tokenizer decisions, stop tokens) is also saved as
    ``out_dir/05_gguf_export.json`` with its provenance.
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    config = read_llama_config(merged_dir)
    name = _check_name(name or merged_dir.name)
    targets = gguf_targets(out_dir, name, types, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    report: dict[str, Any] = {"folder": str(out_dir), "merged_dir": str(merged_dir), "name": name,
                              "stop_tokens": stop_tokens_of(merged_dir, tokenizer), "files": {}}
    for type_name, target in targets.items():
        start = time.perf_counter()
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            info = write_gguf_file(tmp, merged_dir, config, tokenizer, type_name, name)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        size = target.stat().st_size
        report["files"][type_name] = {"path": str(target), "bytes": size, "gib": size / GIB,
                                      "seconds": round(time.perf_counter() - start, 2)}
        report.update({k: v for k, v in info.items() if k != "stored_types"})
        report["files"][type_name]["stored_types"] = info["stored_types"]
    save_json({**report, **result_provenance()}, out_dir / EXPORT_REPORT_FILE)
    return report


# --------------------------------------------------------------------------------------------
# Ollama Modelfile
# --------------------------------------------------------------------------------------------


def modelfile_text(from_path: str, template: str, system_prompt: str, stops: Sequence[str]) -> str:
    """The text of an Ollama ``Modelfile``."""
    for what, text in (("system_prompt", system_prompt), ("chat template", template)):
        if '"""' in text:
            raise GGUFExportError(f'the {what} contains """, which ends a Modelfile block; remove it.')
    lines = [
        "# Ollama: `ollama create <name> -f Modelfile`, then `ollama run <name>` (written by utils.evaluation.gguf).",
        f"FROM {from_path}",
        "",
        "# The chat layout the model was trained with (tokenizer.chat_template of the GGUF), as an Ollama Go template.",
        f'TEMPLATE """{template}"""',
        "",
        "# The dataset's system prompt, sent with every conversation as during training and evaluation.",
        f'SYSTEM """{system_prompt}"""',
        "",
        "# Stop at the end of the assistant turn (the model's EOS and its generation_config end tokens).",
        *[f'PARAMETER stop "{stop}"' for stop in stops],
        "",
        "# Greedy decoding, as in notebook 05's evaluation: the same question always gets the same answer, the one",
        "# that was measured. Ollama's defaults sample (temperature 0.8) and penalise repetition (repeat_penalty",
        "# 1.1), which would change the evaluated answers.",
        "PARAMETER temperature 0",
        "PARAMETER repeat_penalty 1",
        "",
    ]
    return "\n".join(lines)


def write_modelfile(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, system_prompt: str, *,
                    stop_tokens: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write ``out_dir/Modelfile`` for Ollama around ``gguf_path``; return its path.

    The template follows the chat layout the GGUF's ``tokenizer.chat_template`` writes (Llama 3 or ChatML, with
    any fixed system preamble it adds), checked by rendering a chat with that template; the stop tokens are the
    layout's end-of-turn tokens, the GGUF's EOS and any ``stop_tokens`` given (``export_gguf``'s report lists the
    merged model's). ``FROM`` is relative to the Modelfile's folder, so the folder can be moved whole.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    target = out_dir / MODELFILE
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists and write_modelfile never overwrites a file by default: "
                              "move it away, or call write_modelfile(..., overwrite=True) to replace it.")
    # the GGUF's own tokenizer and chat template, as llama.cpp and Ollama will read them (not transformers' GGUF
    # reader, which up to at least 5.17 adds no BOS to a Llama-3 file and takes its BOS for EOS)
    tokenizer = llama_cpp_tokenizer(gguf_path)
    layout = chat_layout(tokenizer, str(gguf_path))
    vocab = tokenizer.get_vocab()
    stops = [s for s in layout["stops"] if s in vocab] + [tokenizer.eos_token] * bool(tokenizer.eos_token)
    stops += list(stop_tokens)
    try:
        from_path = Path(os.path.relpath(gguf_path.resolve(), out_dir.resolve())).as_posix()
        from_path = from_path if from_path.startswith(".") else f"./{from_path}"
    except ValueError:  # another Windows drive: no relative path exists
        from_path = gguf_path.resolve().as_posix()
    text = modelfile_text(from_path, go_template(layout), system_prompt, list(dict.fromkeys(stops)))
    return atomic_write_text(target, text)
