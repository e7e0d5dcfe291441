"""``python -m utils.training``: notebook 04's run from the command line (see ``utils.training.cli``)."""

from utils.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
