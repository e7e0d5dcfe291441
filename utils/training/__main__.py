"""``python -m utils.training``: notebook 04's run from the command line (see ``utils.training.cli``)."""

import os

# Idle OpenMP threads sleep instead of spinning: on 2 shared cores, spinning threads made training steps take
# 17-104 s instead of about 5 s. libgomp reads the variable once, when torch loads it, and ``python -m`` imports
# the package (and torch) before this file, so ``utils/training/__init__.py`` sets it first; this line keeps the
# rule where a reader of the command looks for it. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from utils.training.cli import main  # noqa: E402 - after the environment is set

if __name__ == "__main__":
    raise SystemExit(main())
