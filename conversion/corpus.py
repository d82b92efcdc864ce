"""An offline corpus of real English text for demos and tests: the docstrings of Python's standard library.

Every CPython installation ships it (PSF license), so no network is needed. Each module's docstrings (module,
classes, functions, in source order) form one document; modules are split into train and held-out sets by a hash
of their name, so held-out text never appears in training.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

from datasets import Dataset


def stdlib_documents(min_chars: int = 200) -> list[tuple[str, str]]:
    """``(module path, text)`` for every standard-library module with at least ``min_chars`` of docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(n, clean=True) for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if len(text) >= min_chars:
            docs.append((str(rel), text))
    return docs


def stdlib_corpus(held_out_fraction: float = 0.05) -> tuple[Dataset, Dataset]:
    """``(train, held_out)`` datasets with a ``text`` column, split by module."""
    train, held = [], []
    for name, text in stdlib_documents():
        bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < held_out_fraction else train).append(text)
    return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held})
