"""Helpers shared by the QLoRA notebook series.

Importing this package has no side effects: it sets no seed, no matplotlib state and touches no
files. Each notebook calls what it needs from the submodules (``utils.paths``, ``utils.config``,
``utils.modeling``, ``utils.data``, ``utils.memory``, ``utils.training``, ``utils.evaluation``,
``utils.plotting``, ``utils.runner``).
"""

__version__ = "0.1.0"
