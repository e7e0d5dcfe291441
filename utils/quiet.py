"""Silence the library messages this project cannot fix at their cause, each one narrowly.

``quiet_known_noise()`` runs when a kernel of ``utils.runner`` starts, as the first call of every notebook's setup
cell (for interactive sessions; before anything imports transformers, peft or bitsandbytes) and in every
measurement child (``utils.childproc``). Each filter below names the upstream cause; a warning whose cause is ours
is fixed in our code instead (e.g. ``clean_up_tokenization_spaces`` in ``utils.modeling.load_tokenizer``). Every
other warning still shows.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from tqdm import TqdmWarning

# bitsandbytes >= 0.49 on a CPU with AVX512-BF16 tries, while it is imported, to download a faster 4-bit
# matmul from the Hugging Face hub (``kernels.get_kernel("kernels-community/quantization-bitsandbytes")`` in
# bitsandbytes/backends/cpu/ops.py) and logs a warning when the optional ``kernels`` package or the network is
# missing. It then uses its own built-in CPU kernel, which is what every measurement here is about.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"

# transformers 5.x deprecated ``PreTrainedModel.is_gradient_checkpointing`` (modeling_utils.py) while peft 0.21
# (``PeftModel.__init__``) and trl 1.x (``_unwrap_model_for_generation``) still read it: every adapter and every
# generation during training warns. Our code reads ``is_activation_checkpointing``.
GC_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"

# tqdm.auto picks its Jupyter widget inside a kernel and warns once when ipywidgets is missing; the libraries
# import tqdm.auto themselves, and with their bars off (below) no widget is ever drawn.
TQDM_WIDGET = r"IProgress not found"

# Progress bars of the Hugging Face libraries ("Loading weights", datasets' "Map", "Tokenizing train dataset"):
# in an executed notebook each one lands in stderr as raw text. The libraries read these variables when they
# are imported; a user's own setting wins.
PROGRESS_BAR_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")

# transformers' GGUF loader (``load_gguf_checkpoint``) draws its own tqdm bar, "Converting and de-quantizing GGUF
# tensors...", from ``tqdm.auto`` imported into its module: ``disable_progress_bar`` does not reach it, and in notebook
# 05's round trip of the exported GGUF it left nine lines of raw English text. ``quiet_gguf_loader`` turns it off.
GGUF_LOADER_MODULE = "transformers.modeling_gguf_pytorch_utils"


class DropMessage(logging.Filter):
    """A logging filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__(name="")
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the known one."""
        return not str(record.msg).startswith(self.prefix)


def drop_bitsandbytes_hub_probe() -> None:
    """Drop bitsandbytes' one log line about the CPU kernel it could not download (idempotent).

    ``import utils`` calls it, so every ``python -m utils.…`` command is rid of it before bitsandbytes loads.
    """
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, DropMessage) and f.prefix == BNB_CPU_MESSAGE for f in logger.filters):
        logger.addFilter(DropMessage(BNB_CPU_MESSAGE))


def quiet_known_noise() -> None:
    """Install the narrow filters above (idempotent); a later import of the libraries then stays quiet."""
    drop_bitsandbytes_hub_probe()
    warnings.filterwarnings("ignore", message=GC_DEPRECATION, category=FutureWarning,
                            module=r"transformers\.modeling_utils")
    warnings.filterwarnings("ignore", message=TQDM_WIDGET, category=TqdmWarning)
    for variable in PROGRESS_BAR_VARIABLES:
        os.environ.setdefault(variable, "1")
    disable_loaded_progress_bars()


def disable_loaded_progress_bars() -> None:
    """Turn the bars off in the libraries already imported (they read the variables only at import)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return  # the user asked for the bars
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == "1":
        sys.modules["datasets"].disable_progress_bars()


@contextmanager
def quiet_gguf_loader() -> Iterator[None]:
    """Within the block, transformers' GGUF loader draws no progress bar, unless the user asked for the bars
    (``HF_HUB_DISABLE_PROGRESS_BARS`` set to anything but 1). A transformers release without the module-level ``tqdm``
    is left as it is."""
    module = importlib.import_module(GGUF_LOADER_MODULE)
    original = getattr(module, "tqdm", None)
    if original is None or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        yield
        return
    module.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original
