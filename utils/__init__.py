"""Helpers shared by the QLoRA notebook series.

Importing this package sets no seed, no matplotlib state and touches no files. Its one effect: a logging filter
that drops bitsandbytes' message about a CPU kernel it failed to download from the hub (``utils.quiet``), so
that the commands (``python -m utils.…``, which import this package before bitsandbytes loads) do not open with
it. Each notebook calls what it needs from the submodules (``utils.paths``, ``utils.config``, ``utils.modeling``,
``utils.data``, ``utils.memory``, ``utils.training``, ``utils.evaluation``, ``utils.plotting``, ``utils.runner``).
"""

from utils.quiet import drop_bitsandbytes_hub_probe

drop_bitsandbytes_hub_probe()

__version__ = "0.1.0"
