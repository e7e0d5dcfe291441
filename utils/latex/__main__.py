"""``python -m utils.latex preview|build --profile P [--dir DIR]``: the LaTeX preview of a profile's figures."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from utils.latex.preview import find_pdflatex, run_pdflatex, tex_version, write_preview
from utils.paths import figures_dir, resolve_path


def resolve_folder(profile: str, directory: str | None) -> Path:
    """``--dir`` if given, else the profile's figures folder (``runs/<profile>/figures``)."""
    if directory:
        return resolve_path(directory)
    os.environ["QLORA_PROFILE"] = profile
    return figures_dir()


def main(argv: list[str] | None = None) -> int:
    """Write the preview (``preview``) or write and compile it (``build``); 1 when the build has problems."""
    parser = argparse.ArgumentParser(prog="python -m utils.latex", description=__doc__)
    parser.add_argument("command", choices=("preview", "build"))
    parser.add_argument("--profile", default=os.environ.get("QLORA_PROFILE", "thesis"))
    parser.add_argument("--dir", default=None, help="figures folder (default: runs/<profile>/figures)")
    args = parser.parse_args(argv)
    try:
        path = write_preview(resolve_folder(args.profile, args.dir))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"wrote {path}")
    if args.command == "preview":
        return 0
    pdflatex = find_pdflatex()
    if pdflatex is None:
        print("pdflatex is not installed; see the README (TeX packages) to install it", file=sys.stderr)
        return 1
    print(tex_version(pdflatex))
    summary = run_pdflatex(path.parent, pdflatex=pdflatex)
    print(summary.describe(), flush=True)
    problems = summary.problems()
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"built {path.with_suffix('.pdf')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
