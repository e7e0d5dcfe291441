"""``python -m utils.data validate|convert|build`` (see ``utils.data.cli``)."""

from utils.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
