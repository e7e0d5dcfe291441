"""Reading a GGUF file the way llama.cpp does: its header (metadata and tensor table) and its tokenizer.

``read_gguf_header`` parses the metadata without loading tensors; ``llama_cpp_tokenizer`` builds, from the file's
vocabulary, merges, token types, ``tokenizer.ggml.pre`` and BOS flag, the tokenizer llama.cpp uses for it (what
``utils.evaluation.export.roundtrip_check`` compares with the merged model's, and what the Ollama Modelfile's
stop tokens come from). ``utils.evaluation.gguf`` writes the files.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# llama.cpp names the pre-tokenizer (how text is split before BPE) by the sha256 of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the two hashes are the ones its table lists for these tokenizers.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}

# How llama.cpp splits text before BPE for each tokenizer.ggml.pre this exporter writes (src/llama-vocab.cpp,
# llm_tokenizer_bpe: the regexes apply one after another), whether it looks a whole piece up in the vocabulary
# before merging (ignore_merges) and whether it adds BOS when the file has no tokenizer.ggml.add_bos_token.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_PRE = {
    "llama-bpe": {"splits": (_LLAMA3_SPLIT,), "ignore_merges": True, "add_bos": True},
    "smollm": {"splits": (r"\p{N}", _GPT2_SPLIT), "ignore_merges": False, "add_bos": False},
    "gpt2": {"splits": (_GPT2_SPLIT,), "ignore_merges": False, "add_bos": False},
}


class GGUFExportError(ValueError):
    """The merged folder cannot be exported to GGUF as it is; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Reading a GGUF header
# --------------------------------------------------------------------------------------------


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_value(buf, pos: int, kind: int, keep: bool = False) -> tuple[Any, int]:
    """One GGUF metadata value at ``pos``; unless ``keep``, arrays of strings or of more than 1024 numbers come
    back as their length."""
    if kind == 8:
        (size,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8: pos + 8 + size]).decode("utf-8"), pos + 8 + size
    if kind != 9:
        fmt = _GGUF_SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _GGUF_SCALARS and count > 1024 and not keep:
        return count, pos + count * struct.calcsize(_GGUF_SCALARS[item])
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, item)
        values.append(value)
    return (count if item == 8 and not keep else values), pos


def read_gguf_header(gguf_path: str | os.PathLike, keep: Sequence[str] = ()) -> tuple[dict[str, Any], dict, int]:
    """(metadata, {tensor: (shape in ggml order, ggml type, offset)}, start of the tensor data) of a GGUF file.

    Arrays come back whole only for the keys in ``keep`` (else as their length, see ``_read_value``).
    A reader of the header only (the GGUF v3 layout): gguf-py's ``GGUFReader`` also parses every token string
    into its own array, seconds for a 128k vocabulary, and the round trip only needs a few keys and one tensor.
    """
    with open(gguf_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version < 2:
            raise GGUFExportError(f"{gguf_path} is not a GGUF file of version 2 or later.")
        pos, metadata = 24, {}
        for _ in range(n_kv):
            key, pos = _read_value(buf, pos, 8)
            (kind,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = _read_value(buf, pos + 4, kind, keep=key in keep)
        tensors = {}
        for _ in range(n_tensors):
            name, pos = _read_value(buf, pos, 8)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            tensors[name], pos = (shape, kind, offset), pos + 16 + 8 * n_dims
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    return metadata, tensors, -(-pos // alignment) * alignment


def rope_freqs_of(gguf_path: Path) -> np.ndarray | None:
    """The ``rope_freqs`` tensor of a GGUF file (float32), or None when it has none."""
    _, tensors, data_start = read_gguf_header(gguf_path)
    if "rope_freqs.weight" not in tensors:
        return None
    shape, kind, offset = tensors["rope_freqs.weight"]
    if kind != gguf.GGMLQuantizationType.F32:
        raise GGUFExportError(f"{gguf_path}: rope_freqs is stored as type {kind}, llama.cpp writes F32.")
    return np.fromfile(gguf_path, dtype=np.float32, count=int(np.prod(shape)), offset=data_start + offset)


def llama_cpp_tokenizer(gguf_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, built from its metadata the way llama.cpp reads it.

    Vocabulary, merges, token types (CONTROL tokens special, USER_DEFINED ones added, both matched whole in the
    text), ``tokenizer.ggml.pre`` (``LLAMA_CPP_PRE``: llama.cpp's split regexes and ignore_merges),
    ``add_bos_token``/``add_eos_token``, the BOS/EOS/pad ids and ``tokenizer.chat_template``. This is what the
    round trip and the Modelfile read, rather than transformers' own GGUF reader: up to at least transformers 5.17
    that reader ignores ``tokenizer.ggml.pre`` and splits a Llama-3 vocabulary with GPT-2's regex (the
    ``is_llama_3_tokenizer`` branch of ``GGUFLlamaConverter`` in ``transformers.integrations.ggml``), adds no BOS and
    takes the BOS token for EOS, so no chat prompt tokenises as llama.cpp would. Files of another tokenizer model
    or pre-tokenizer are refused (this exporter writes none).
    """
    keep = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    meta = read_gguf_header(gguf_path, keep=keep)[0]
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in LLAMA_CPP_PRE:
        raise GGUFExportError(f"{gguf_path}: tokenizer.ggml.model={model!r}, tokenizer.ggml.pre={pre!r}; only the "
                              f"GPT-2 BPE tokenizers of {sorted(LLAMA_CPP_PRE)} (what export_gguf writes) are read.")
    rules = LLAMA_CPP_PRE[pre]
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                   ignore_merges=rules["ignore_merges"]))
    types = meta.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rules["splits"]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    special = {name: tokens[meta[f"tokenizer.ggml.{name}_token_id"]] for name in ("bos", "eos", "padding")
               if f"tokenizer.ggml.{name}_token_id" in meta}
    add = {"bos": meta.get("tokenizer.ggml.add_bos_token", rules["add_bos"]),
           "eos": meta.get("tokenizer.ggml.add_eos_token", False)}
    if any(add[name] and name not in special for name in add):
        raise GGUFExportError(f"{gguf_path}: add_bos_token/add_eos_token is set but the file names no such token.")
    first = [special["bos"]] * bool(add["bos"])
    last = [special["eos"]] * bool(add["eos"])
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join([*first, "$A", *last]), pair=" ".join([*first, "$A", *last, *first, "$B:1", *last]),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(first + last)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special.get("bos"),
                                        eos_token=special.get("eos"), pad_token=special.get("padding"))
    tokenizer.chat_template = meta.get("tokenizer.chat_template")
    return tokenizer
