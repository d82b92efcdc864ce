"""The wheel must ship every sub-package: pyproject lists packages by hand, so a new one is easy to forget."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    # Nested mappings (hf_fwp.modeling lives in modeling/) are found through their own entry.
    assert found == listed, {"missing from pyproject": sorted(found - listed), "listed but absent": sorted(listed - found)}
