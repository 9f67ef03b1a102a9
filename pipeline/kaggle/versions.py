"""The package versions a Kaggle bundle was built and verified with, and the versions known not to work.

``make kaggle`` records ``recorded()`` in ``bundle.json``; the notebook prints them beside what the Kaggle
image has (``report``) and stops with one readable line on a version known to break the bundle
(``check``), before any image is read. The ranges in ``pyproject.toml`` are the tested ones:
- albumentations >= 1.4.21: ``Compose(seed=)`` (seeded augmentations) appeared there; 1.4.20 fails;
- lightgbm 4.0 and 4.1 cannot read the level-2 models newer LightGBM writes (``unordered_map::at``);
  3.3.5 and 4.2-4.7 read them and predict the same values (checked by hand with each release).
"""
from __future__ import annotations

from importlib import metadata

from pipeline.errors import InputError

PACKAGES = ("torch", "timm", "albumentations", "ttach", "lightgbm", "scikit-learn", "pandas", "numpy", "pyarrow",
            "pydantic", "pillow")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _tuple(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


# (package, is it bad, why; what to do)
KNOWN_BAD = [
    ("albumentations", lambda v: _tuple(v) < (1, 4, 21),
     "has no Compose(seed=), which the bundle's transforms use; needs albumentations >= 1.4.21"),
    ("lightgbm", lambda v: (4, 0) <= _tuple(v)[:2] < (4, 2),
     "cannot read the bundle's level-2 models (LightGBMError unordered_map::at); needs lightgbm 3.3 or >= 4.2"),
]


def recorded() -> dict:
    """{package: version} of this environment (what a bundle is built and verified with)."""
    return {p: v for p in PACKAGES if (v := _version(p)) is not None}


def report(built: dict | None) -> str:
    now = recorded()
    rows = [f"  {p:<15} built with {(built or {}).get(p, '?'):<14} here {now.get(p, 'missing')}" for p in PACKAGES
            if p in now or p in (built or {})]
    return "package versions (the bundle was built and verified with; this environment has):\n" + "\n".join(rows)


def check(needs: set[str] | None = None, installed: dict | None = None) -> None:
    """Refuse a known-bad version of a package the bundle needs (``needs``: all when None)."""
    installed = recorded() if installed is None else installed
    for pkg, bad, why in KNOWN_BAD:
        v = installed.get(pkg)
        if v is not None and (needs is None or pkg in needs) and bad(v):
            raise InputError(f"{pkg} {v} {why}: attach a wheel of a working version to the notebook (or add it to "
                             "the bundle's wheels/ with `make kaggle`) and install it before this cell")
