"""Loading teachers (local folder, Hub id or GGUF file) and sharing results on the Hub."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# What a model folder written by hf-fwp holds and push uploads, by name (everything else, e.g. checkpoints, a user's
# notes.txt, credentials.json or own scripts, stays local). Python files: the model's modules, found from
# modeling_fwp.py's relative imports (files_to_upload).
UPLOAD_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "chat_template.json",
                   "chat_template.jinja", "results.json", "model.safetensors", "model-*-of-*.safetensors",
                   "model.safetensors.index.json", "README.md", "LICENSE", "LICENSE.md", "LICENSE.txt", "merges.txt",
                   "vocab.txt", "tokenizer.model")
# A git branch name: no "..", "@{", "//", control characters, spaces or ~^:?*[\; not starting with "-" or ending
# with "/", "." or ".lock".
_BRANCH = re.compile(r"(?!-)(?!.*\.\.)(?!.*@\{)(?!.*//)[A-Za-z0-9._/\-]+(?<!\.lock)(?<![./])")


def load_teacher(spec: str, *, dtype=None, role: str = "teacher", tokenizer: bool = True):
    """``(model, tokenizer)`` from a local folder, a ``.gguf`` file (dequantised to float32) or a Hub id (the
    tokenizer is None with ``tokenizer=False``).

    ``role`` names the model in errors ("teacher", "student", "model"). Raises ``FileNotFoundError`` for a path that
    does not exist (locally or on the Hub) and ``ValueError`` for a file that is not GGUF, unreadable, missing,
    mis-shaped or non-finite weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or path.suffix in (".gguf", ".bin", ".safetensors")
    if looks_local and not path.exists():
        raise FileNotFoundError(f"{role} {spec!r} does not exist.")
    if not path.exists():
        check_on_hub(spec, "model")
    if path.is_dir() and not (path / "config.json").exists() and (path / "recipe.json").exists():
        model = path / "model"
        raise ValueError(f"{role} {spec!r} is a distill run folder, not a model: "
                         + (f"its model is {model}." if (model / "config.json").exists() else
                            "its run has not finished (no model/ yet); resume it with distill --resume, or load "
                            f"the attention-transfer student {path / 'stage1'}."))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{role} {spec!r} is a file but not a .gguf model; pass a model folder, a GGUF file or "
                             "a Hub id.")
        from transformers import GgufConfig

        kwargs = dict(gguf_file=path.name)
        model, info = AutoModelForCausalLM.from_pretrained(path.parent, quantization_config=GgufConfig(dequantize=True),
                                                           dtype=dtype or "float32", output_loading_info=True, **kwargs)
        _check_weights(model, info, spec, role)
        return model.eval(), AutoTokenizer.from_pretrained(path.parent, **kwargs) if tokenizer else None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or "auto", output_loading_info=True)
    except Exception as e:
        if "safetensor" in type(e).__name__.lower():
            raise ValueError(f"{spec}: the weights cannot be read ({type(e).__name__}: {_one_line(e)}); the "
                             "safetensors file is damaged or incomplete: copy or save it again.") from None
        if isinstance(e, RuntimeError) and "mismatched" in str(e):
            shapes = [line.strip() for line in str(e).splitlines() if "shape" in line.lower()][:3]
            raise ValueError(f"{role} {spec!r}: weights do not have the shapes its config.json gives "
                             f"({'; '.join(shapes) or _one_line(e)[:300]}); the config and the weights belong to "
                             "different models: save the model again.") from None
        raise
    _check_weights(model, info, spec, role)
    if not tokenizer:
        return model.eval(), None
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{spec}: no usable tokenizer beside the model ({_one_line(e)}); save the tokenizer into "
                         "the folder (tokenizer.save_pretrained).") from None
    return model.eval(), tok


def _check_weights(model, info: dict, spec: str, role: str) -> None:
    """Refuse a model that transformers loaded with weights missing from its files (it would fill them with random
    values and only log it) or with NaN / inf weights (everything computed from them would be NaN)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{role} {spec!r} lacks {len(missing)} weight(s) its config needs ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); transformers would initialise them at random: "
                         "the weights file is incomplete or from another model.")
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"{role} {spec!r} has NaN or inf weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the model is broken (a diverged training run?).")


def nonfinite_parameters(model) -> list[str]:
    """Names of ``model``'s parameters that hold a NaN or an inf."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def teacher_license(spec: str) -> str | dict | None:
    """The licence of a teacher where it says one (a GGUF file's ``general.license``, the ``license`` of a model
    card's metadata in a local folder or, when reachable or cached, on the Hub): its id, or a dict with the card's
    ``license``, ``license_name`` and ``license_link`` (``license: other``) and ``license_file``, the teacher
    folder's LICENSE file, when there is more to carry than the id; None when unknown."""
    path = Path(spec)
    try:
        if path.is_file() and path.suffix == ".gguf":
            import gguf

            field = gguf.GGUFReader(str(path)).fields.get("general.license")
            return str(field.contents()) if field is not None else None
        from huggingface_hub import ModelCard

        card = path / "README.md"
        if path.is_dir() and not card.is_file():
            return None
        data = ModelCard.load(card if path.is_dir() else spec).data
    except Exception:  # noqa: BLE001 - an unreadable card or no network: the licence is unknown, not an error
        return None
    terms = {k: data.get(k) for k in ("license", "license_name", "license_link") if data.get(k)}
    files = sorted(path.glob("LICEN[CS]E*")) if path.is_dir() else []
    if files:  # the terms themselves travel with the student (save_final copies the file)
        terms["license_file"] = str(files[0])
    return terms if len(terms) > 1 else terms.get("license")


def check_on_hub(name: str, kind: str) -> None:
    """``name`` is not a local path: make sure it is a Hub ``kind`` ("model" or "dataset") with one short request,
    instead of letting a loader retry for a minute, and say that both readings failed. The local cache counts (an
    offline machine with the files cached is fine)."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE or _in_cache(name, kind):
        return
    try:
        getattr(HfApi(), f"{kind}_info")(name, timeout=10)
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is neither a local path (nothing at {Path(name).resolve()}) nor a {kind} "
                                f"on the Hugging Face Hub ({type(e).__name__}: {_one_line(e)[:200]}).") from None


def _in_cache(name: str, kind: str) -> bool:
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == name and r.repo_type == kind for r in scan_cache_dir().repos)
    except Exception:  # no cache folder yet
        return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def files_to_upload(folder) -> list[str]:
    """The relative paths :func:`push` uploads from ``folder`` (sorted)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json).")
    files = {p for pattern in UPLOAD_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    if (folder / "modeling_fwp.py").is_file():
        from transformers.dynamic_module_utils import get_relative_import_files

        # The model's code: its two entry modules and every module they import, not any .py a user keeps there.
        for entry in ("modeling_fwp.py", "configuration_fwp.py"):
            if (folder / entry).is_file():
                files |= {folder / entry, *map(Path, get_relative_import_files(str(folder / entry)))}
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{folder} has a config.json but no model weights (*.safetensors): save the model "
                                "into it (save_pretrained) before pushing.")
    return sorted(str(p.relative_to(folder)) for p in files)


def push(folder, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
         revision: str | None = None) -> list[str]:
    """Upload a saved model folder to ``repo_id`` with ``huggingface_hub`` (to the branch ``revision``, created from
    main when missing); ``dry_run`` only returns the file list."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid Hub repository id (user/name): {e}") from None
    if revision is not None and not _BRANCH.fullmatch(revision):
        raise ValueError(f"{revision!r} is not a valid branch name (letters, digits, '.', '_', '-', '/'; no '..', "
                         "no leading '-', no trailing '/' or '.').")
    files = files_to_upload(folder)
    if dry_run:
        return files
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise ValueError("no Hugging Face token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN, "
                         "then push again.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=files, revision=revision,
                      commit_message="Upload FWP model (hf-fwp)")
    return files
