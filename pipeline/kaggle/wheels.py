"""The wheels a bundle carries: this package's own, and one for each requirement a Kaggle image lacks.

What the image has is taken from Kaggle's own list of what its Python image installs
(Kaggle/docker-python, ``installed_cpu_packages.txt``): torch 2.10, torchvision 0.25, timm 1.0.26,
numpy 2.4.6, pandas 2.3.3, scikit-learn 1.6.1, lightgbm 4.6.0, albumentations 2.0.8, scipy 1.16,
pillow 11.3, PyYAML 6.0.3, matplotlib 3.10, pyarrow 24, tqdm 4.67, pydantic 2.12, ipykernel 6.17:
every requirement of ours but ``ttach``. Requirements are walked from the built wheel's own metadata,
so a new dependency is bundled (or refused, if it is one that must never be) without editing this file.
A notebook then installs with ``pip install --no-index --find-links <bundle>/wheels pipeline``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from pipeline.errors import InputError
from pipeline.store.io import log

# distributions (canonical names) preinstalled in Kaggle's Python image that our requirements name
KAGGLE_IMAGE = frozenset({
    "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "lightgbm", "albumentations", "scipy",
    "pillow", "pyyaml", "matplotlib", "pyarrow", "tqdm", "pydantic", "opencv-python-headless", "packaging",
    "optuna", "sqlalchemy", "alembic", "colorlog", "ipykernel",
})
# never bundled: the image's own CUDA build must be used (a wheel would be gigabytes and the wrong build)
NEVER = ("torch", "torchvision", "triton", "nvidia-")
PACKAGE = "pipeline"


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def applicable(lines) -> list:
    """Requirement objects that apply here without extras (``extra == ...`` markers are skipped)."""
    from packaging.requirements import Requirement

    reqs = []
    for line in lines or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            reqs.append(req)
    return reqs


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise InputError(f"could not build {what} (`{' '.join(cmd[2:])}`): {(run.stderr or run.stdout).strip()[-600:]}. "
                         "Offline, download the wheel elsewhere (`pip download --no-deps <name>==<version>`) and "
                         "point PIP_FIND_LINKS at its folder.")


def own_wheel(dest: Path) -> Path:
    """This package's wheel, built from the checkout's sources (copied, so nothing is written beside them)."""
    root = Path(__file__).resolve().parents[2]  # the checkout: pipeline/kaggle/wheels.py -> .
    if not (root / "pyproject.toml").exists():
        raise InputError(f"{root}: no pyproject.toml; `make kaggle` builds the package's wheel from a checkout of the "
                         "repository, run it there.")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(root / "pyproject.toml", src / "pyproject.toml")
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest), str(src)],
             f"the wheel of '{PACKAGE}'")
    return next(dest.glob(f"{PACKAGE}-*.whl"))


def wheelapplicable(wheel: Path) -> list:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    return applicable([line.split(":", 1)[1].strip() for line in text.splitlines()
                          if line.startswith("Requires-Dist:")])


def missing_on_kaggle(reqs: list, seen: set | None = None) -> dict[str, str]:
    """{distribution: installed version} of every requirement (and theirs) the Kaggle image lacks."""
    seen = set() if seen is None else seen
    out: dict[str, str] = {}
    for req in reqs:
        name = _canonical(req.name)
        if name in seen or name in KAGGLE_IMAGE:
            continue
        seen.add(name)
        if any(name == n or (n.endswith("-") and name.startswith(n)) for n in NEVER):
            raise InputError(f"requirement '{name}' must come from the Kaggle image, never from a bundle; "
                             "drop the pin that pulls it in.")
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise InputError(f"requirement '{req}' is not installed here, so the bundle cannot carry the version "
                             "tested with; run `make setup`.") from None
        out.update(missing_on_kaggle(applicable(metadata.requires(name)), seen))
    return out


def build_wheels(dest: Path) -> list[str]:
    """Fill ``dest`` with our wheel and one per requirement Kaggle lacks (the versions installed here)."""
    dest.mkdir(parents=True, exist_ok=True)
    ours = own_wheel(dest)
    extra = missing_on_kaggle(wheelapplicable(ours))
    for name, version in sorted(extra.items()):
        _pip(["wheel", "--no-deps", "-w", str(dest), f"{name}=={version}"], f"a wheel of {name}=={version}")
    names = sorted(p.name for p in dest.glob("*.whl"))
    log(f"[kaggle] wheels: {', '.join(names)} (Kaggle's image has the rest: {', '.join(sorted(KAGGLE_IMAGE))})")
    return names
