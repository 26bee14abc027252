#!/usr/bin/env python3
"""Point every notebook at the project's Jupyter kernel, so JupyterLab opens it with the venv's python.

env/setup.sh registers the kernel "Python (lwlib)" under the name ``lwlib`` (inside the venv); this writes
``metadata.kernelspec = {name: lwlib, display_name: "Python (lwlib)", language: python}`` into each notebook
and changes nothing else (the JSON layout of nbformat, indent 1, is kept). Headless runs do not depend on
it: run_all.sh and the notebook tests execute with kernel ``python3`` (lwlib.nbrun).

    python env/set_kernelspec.py                 # every notebooks/*.ipynb
    python env/set_kernelspec.py --check         # exit 1 naming the notebooks that lack it
    python env/set_kernelspec.py a.ipynb b.ipynb
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python (lwlib)", "language": "python", "name": "lwlib"}
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    ap.add_argument("--check", action="store_true", help="only report notebooks whose kernelspec differs")
    args = ap.parse_args(argv)
    paths = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    wrong = []
    for p in paths:
        nb = json.loads(p.read_text(encoding="utf-8"))
        if nb.get("metadata", {}).get("kernelspec") == KERNELSPEC:
            continue
        wrong.append(p)
        if not args.check:
            nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
            p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"{p}: kernelspec set to {KERNELSPEC['name']!r}")
    if args.check and wrong:
        print("kernelspec is not the project's ('lwlib') in: " + ", ".join(map(str, wrong))
              + "\n  fix: python env/set_kernelspec.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
