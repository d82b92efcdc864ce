"""An offline corpus of real English text of several kinds, for distillation and honest evaluation.

Every machine that has Python and hf-fwp installed has it, so no network is needed:

* ``"stdlib docstrings"``: the docstrings of Python's standard library (PSF license), one document per module;
* ``"package docstrings"``: the docstrings of the installed third-party packages (torch, transformers, numpy, ...),
  one document per module, read from the source files (nothing is imported);
* ``"package READMEs"``: the long descriptions (READMEs, changelogs) of the installed distributions.

Licence texts are left out: they are near-duplicate boilerplate repeated in hundreds of packages, so paragraphs
that are licence text are dropped from every document. Documents are split into train and held-out sets by a hash
of their group (the stdlib module, the top-level package, the distribution), so held-out text never appears in
training, not even as another module of the same package.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import sysconfig
from pathlib import Path

from datasets import Dataset

KINDS = ("stdlib docstrings", "package docstrings", "package READMEs")
# Paragraphs with these are licence boilerplate (MIT, BSD, Apache, GPL and their disclaimers).
_LICENSE = re.compile(
    r"permission is hereby granted|redistribution and use in source and binary forms|licensed under the apache "
    r"license|apache license,? version 2|gnu (lesser |affero )?general public license|the software is provided "
    r"\"?as is\"?|this (program|library) is free software|without warranties or conditions of any kind|"
    r"copyright \(c\)|all rights reserved|spdx-license-identifier",
    re.IGNORECASE,
)
_SKIP_PACKAGES = {"hf_fwp", "hf_fwp_cli", "modeling", "conversion", "_distutils_hack", "pip", "setuptools", "pkg_resources"}
_SKIP_DISTRIBUTIONS = {"hf-fwp"}


def drop_license_text(text: str) -> str:
    """``text`` without its paragraphs of licence boilerplate (paragraphs: blocks separated by blank lines)."""
    return "\n\n".join(p for p in re.split(r"\n\s*\n", text) if p.strip() and not _LICENSE.search(p))


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts = [ast.get_docstring(n, clean=True) for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return drop_license_text("\n\n".join(p for p in parts if p))


def stdlib_documents(min_chars: int = 200) -> list[tuple[str, str]]:
    """``(module path, text)`` for every standard-library module with at least ``min_chars`` of docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        text = _docstrings(path)
        if len(text) >= min_chars:
            docs.append((str(rel), text))
    return docs


def package_docstring_documents(min_chars: int = 200, max_chars_per_package: int = 200_000) -> list[tuple[str, str, str]]:
    """``(package, module path, text)`` for the installed third-party packages' modules (tests left out), at most
    ``max_chars_per_package`` characters per top-level package (the largest would drown the others)."""
    root = Path(sysconfig.get_paths()["purelib"])
    docs = []
    for package in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isidentifier()):
        if package.name in _SKIP_PACKAGES:
            continue
        used = 0
        for path in sorted(package.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in ("tests", "test", "testing", "_vendor", "vendored") for part in rel.parts):
                continue
            text = _docstrings(path)
            if len(text) < min_chars:
                continue
            docs.append((package.name, str(rel), text))
            used += len(text)
            if used >= max_chars_per_package:
                break
    return docs


def readme_documents(min_chars: int = 500) -> list[tuple[str, str]]:
    """``(distribution, text)``: the long description of every installed distribution that has one."""
    docs = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if not name or name in _SKIP_DISTRIBUTIONS or name in docs:
            continue
        text = drop_license_text(dist.metadata.get_payload() or dist.metadata.get("Description") or "")
        if len(text) >= min_chars:
            docs[name] = text
    return sorted(docs.items())


def _held_out(group: str, fraction: float) -> bool:
    return _rank(group) < fraction


def _rank(group: str) -> float:
    """A fixed pseudo-random number in [0, 1] per group name (the split must not depend on file order)."""
    return int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _split_by_size(docs: list[tuple[str, str]], held_chars: int) -> tuple[list[str], list[str]]:
    """``(train, held)`` texts: whole groups, taken in :func:`_rank` order, go to ``held`` until it has
    ``held_chars`` characters (at most a third of the text), so that each held-out set is big enough whatever the
    installed packages; the rest trains."""
    by_group: dict[str, list[str]] = {}
    for group, text in docs:
        by_group.setdefault(group, []).append(text)
    limit = min(held_chars, sum(len(t) for _, t in docs) // 3)
    train, held, size = [], [], 0
    for group in sorted(by_group, key=_rank):
        target = held if size < limit else train
        target += by_group[group]
        size += sum(len(t) for t in by_group[group]) if target is held else 0
    return train, held


def offline_corpus(held_chars: int = 60_000) -> tuple[Dataset, dict[str, Dataset]]:
    """``(train, {kind: held_out})``: one training set mixing every kind of :data:`KINDS`, and a held-out set per
    kind (datasets with a ``text`` column). The standard library is split as :func:`stdlib_corpus` splits it; the
    packages' docstrings and READMEs by package / distribution, about ``held_chars`` characters held out each."""
    stdlib_train, stdlib_held = stdlib_corpus()
    doc_train, doc_held = _split_by_size([(pkg, text) for pkg, _, text in package_docstring_documents()], held_chars)
    readme_train, readme_held = _split_by_size(readme_documents(), held_chars)
    held = {"stdlib docstrings": list(stdlib_held["text"]), "package docstrings": doc_held, "package READMEs": readme_held}
    # Some files ship twice (vendored copies, duplicated modules): a held-out text must not train under another name.
    held_texts = {t for texts in held.values() for t in texts}
    train = [t for t in list(stdlib_train["text"]) + doc_train + readme_train if t not in held_texts]
    return Dataset.from_dict({"text": train}), {k: Dataset.from_dict({"text": v}) for k, v in held.items()}


def stdlib_corpus(held_out_fraction: float = 0.05) -> tuple[Dataset, Dataset]:
    """``(train, held_out)`` datasets with a ``text`` column of standard-library docstrings, split by module."""
    train, held = [], []
    for name, text in stdlib_documents():
        (held if _held_out(name, held_out_fraction) else train).append(text)
    return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held})
