"""Output folders that are never half-written and never silently replaced."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from hf_fwp.modeling.modeling_fwp import temporary_folder_beside


def check_output_folder(path, *, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    """Refuse an output path that is a file, or a non-empty folder unless ``overwrite``; returns it as a Path.

    ``flag`` names how the caller's user says "overwrite" (``--overwrite`` on the command line)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder: choose a folder path for the output.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} is not empty: choose a new folder, or pass {flag} to replace what it holds.")
    return path


@contextmanager
def atomic_folder(path, *, overwrite: bool = False, flag: str = "overwrite=True"):
    """Yield a temporary folder beside ``path``; when the block finishes it becomes ``path`` in one rename.

    An exception (or a kill) inside the block leaves ``path`` as it was (a leftover ``.<name>.tmp-*`` folder at
    worst, never a folder that loads as a broken model). With ``overwrite`` an existing folder is moved aside
    first and deleted only once the new one is in place."""
    path = check_output_folder(path, overwrite=overwrite, flag=flag)
    tmp = temporary_folder_beside(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            (old / path.name).rename(path)  # put the old folder back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
