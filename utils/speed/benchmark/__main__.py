"""``python -m utils.speed.benchmark …``: the benchmark's command line (``utils.speed.benchmark.cli``)."""

import sys

from utils.speed.benchmark.peer import import_unsloth_first

# A child process that measures Unsloth imports it before transformers, peft and trl, which the command line's
# modules import at their top (Unsloth patches them as it loads)
import_unsloth_first(sys.argv[1:])

from utils.speed.benchmark.cli import main  # noqa: E402  (after Unsloth: see above)

if __name__ == "__main__":
    raise SystemExit(main())
