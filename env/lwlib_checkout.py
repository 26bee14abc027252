"""Each checkout runs its own lwlib, even where several share one virtual environment.

``env/setup.sh`` copies this file into the environment's site-packages as ``_lwlib_checkout.py`` and adds
``_lwlib_checkout.pth`` (``import _lwlib_checkout``), so it runs at every start of the environment's python. The
editable install points at the checkout that ran the setup; a python started inside *another* checkout of the
project (its folder or any folder below it: ``notebooks/``, where JupyterLab starts a notebook's kernel) would
import that first checkout's lwlib and write into its ``runs/`` and ``figures/``. This puts a finder for the
package ``lwlib`` (and only it) first, which finds it in the checkout the process started in, so
``lwlib.runs.REPO_ROOT`` is that checkout. A checkout is a folder holding ``lwlib/__init__.py`` and a
``pyproject.toml`` of the project ``lwlib``. Nothing changes outside a checkout, where ``$PYTHONPATH`` already
names a checkout (``run_all.sh``), or with ``LWLIB_CHECKOUT=installed``.

Usage (what setup.sh does)::

    cp env/lwlib_checkout.py "$site/_lwlib_checkout.py"; echo "import _lwlib_checkout" > "$site/_lwlib_checkout.pth"
    python -c "import lwlib; print(lwlib.__file__)"      # in checkout B's notebooks/: B/lwlib/__init__.py
"""

from __future__ import annotations

import os
import sys


def find_checkout(start: str) -> str | None:
    """The project checkout holding the folder ``start`` (itself or a parent), or None."""
    d = os.path.abspath(start)
    while True:
        toml = os.path.join(d, "pyproject.toml")
        if os.path.isfile(os.path.join(d, "lwlib", "__init__.py")) and os.path.isfile(toml):
            try:
                with open(toml, encoding="utf-8") as f:
                    if 'name = "lwlib"' in f.read(4096):
                        return d
            except OSError:
                pass
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


class CheckoutFinder:
    """A ``sys.meta_path`` finder that finds the package ``lwlib`` in ``root`` (its submodules follow its
    ``__path__``)."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name != "lwlib":
            return None
        from importlib.machinery import PathFinder

        return PathFinder.find_spec(name, [self.root])


def install() -> str | None:
    """Put a :class:`CheckoutFinder` first for the checkout of the working directory; returns its root or None."""
    if os.environ.get("LWLIB_CHECKOUT") == "installed":
        return None
    for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if os.path.isfile(os.path.join(entry, "lwlib", "__init__.py")):
            return None  # an explicit choice (run_all.sh's)
    try:
        root = find_checkout(os.getcwd())
    except OSError:  # a deleted working directory
        return None
    if root is None or any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        return None
    sys.meta_path.insert(0, CheckoutFinder(root))
    return root


install()
