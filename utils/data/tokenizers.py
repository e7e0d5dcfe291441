"""The tokenizers the dataset is measured with: loading by name, with a fallback, and how tables name them."""

from __future__ import annotations

from typing import Any

from utils.modeling import ModelNotAvailableError, load_tokenizer, resolve_model


def as_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer object or a model name for ``load_tokenizer`` (None stays None)."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    return load_tokenizer(tokenizer)


def tokenizer_special_tokens(tokenizer: Any) -> list[str]:
    """Text that must not appear in content (none for None): a loaded tokenizer's ``all_special_tokens`` and every
    added token it flags special. transformers 5 lists only the named ones (BOS, EOS, PAD) in the first; Llama-3.2's
    other 254 (its chat markers, ``<|python_tag|>``, the reserved ones, and ``<|image|>``, id 128256, one past the
    text model's embeddings) are only in ``added_tokens_decoder``, and each one in content becomes its single id."""
    named = getattr(tokenizer, "all_special_tokens", None) or []
    added = [t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
             if getattr(t, "special", False)]
    return [t for t in dict.fromkeys([*named, *added]) if isinstance(t, str) and t.strip()]


def tokenizer_name(tokenizer: Any) -> str:
    """Short name of a loaded tokenizer (the last part of its folder or hub id) for messages."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__).rstrip("/").split("/")[-1]


def tokenizer_label(name: str) -> str:
    """How tables and figures name the tokenizer of a model name."""
    return "Llama-3.2" if name == "llama-3.2" else resolve_model(name).label


def load_tokenizer_or_fallback(name: str, fallback: str = "llama-3.2") -> tuple[Any, str]:
    """The tokenizer of ``name`` and its label; the ``fallback`` one (with a printed note) if unavailable."""
    try:
        return load_tokenizer(name), tokenizer_label(name)
    except ModelNotAvailableError as exc:
        print(f"Nota: no se pudo cargar el tokenizador de {name!r}: {exc}\n"
              f"Se usa en su lugar el tokenizador {fallback!r}; sus longitudes valen para {name} solo si "
              "ambos comparten vocabulario y plantilla de chat.")
        return load_tokenizer(fallback), f"{tokenizer_label(fallback)} (en lugar de {name})"


def load_tokenizers(model_name: str, reference: str = "llama-3.2") -> dict[str, Any]:
    """Label -> tokenizer for the reference tokenizer and the model's own (once, if it is the same)."""
    tokenizers = {tokenizer_label(reference): as_tokenizer(reference)}
    if model_name != reference:
        tokenizer, label = load_tokenizer_or_fallback(model_name, fallback=reference)
        if label.startswith(f"{tokenizer_label(reference)} (en lugar de"):
            print(f"Las longitudes de {model_name} se leen en la fila de {tokenizer_label(reference)}.")
        else:
            tokenizers[label] = tokenizer
    return tokenizers
