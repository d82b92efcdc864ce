"""A saved folder is self-contained remote code: it loads and runs with only transformers and torch."""

from __future__ import annotations

import ast
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import hf_fwp
from hf_fwp.modeling import configuration_fwp
from tests.modeling.helpers import load_in_fresh_process, tiny_model

MODELING_DIR = Path(configuration_fwp.__file__).parent
# Every layer layout: pure FWP of each rule, the LoLCATs hybrid layer, and full + FWP + sliding layers.
VARIANTS = {
    "linear": dict(fwp_rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True),
    "gated_linear": dict(fwp_rule="gated_linear"),
    "delta": dict(fwp_rule="delta"),
    "gated_delta": dict(fwp_rule="gated_delta"),
    "hybrid_sliding": dict(layout="lolcats", fwp_rule="linear", feature_map="t2r", qk_l2norm=False),
    "full_linear_sliding": dict(layout="hybrid", fwp_rule="gated_delta"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{name: (folder, model)}`` for every variant, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("remote")
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        model = tiny_model(seed=i, **kw)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def test_the_folder_carries_the_package_modules_and_needs_only_transformers_and_torch(saved):
    folder, _ = saved["gated_delta"]
    shipped = sorted(p.name for p in folder.glob("*.py"))
    needed = sorted({Path(f).name for f in get_relative_import_files(MODELING_DIR / "modeling_fwp.py")})
    assert shipped == sorted(needed + ["modeling_fwp.py"])
    assert {"ops_delta_rule_reference.py", "ops_linear_attn_triton.py", "ops_step_triton.py", "layers_rotary.py",
            "configuration_fwp.py"} <= set(shipped)
    for name in shipped:
        # The very files of the installed package, not copies that could drift.
        assert (folder / name).read_bytes() == (MODELING_DIR / name).read_bytes(), name
        # What transformers' loader will demand on the loading side (Triton is imported in try blocks only).
        third_party = set(get_imports(folder / name)) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "huggingface_hub"}, (name, third_party)
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and "." not in (node.module or ""), f"{name}: only flat sibling imports load"
    assert any(p.name.startswith("ops_") for p in folder.glob("*.py"))


def test_every_layout_runs_without_hf_fwp_or_triton_installed(saved, tmp_path):
    ids = torch.tensor([[3, 9, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]])
    prompt = ids[:, :6]
    results = load_in_fresh_process([folder for folder, _ in saved.values()], ids, prompt, max_new_tokens=6,
                                    modules_cache=tmp_path / "modules")
    for (name, (folder, model)), result in zip(saved.items(), results):
        with torch.no_grad():
            expected = model(ids).logits
            expected_gen = model.generate(prompt, max_new_tokens=6, do_sample=False).tolist()
        assert result["module"].startswith("transformers_modules."), name
        assert not [m for m in result["class_modules"] if m.startswith("hf_fwp")], name
        torch.testing.assert_close(result["logits"], expected, atol=1e-6, rtol=1e-5, msg=name)
        assert result["gen"] == expected_gen, name
        assert result["hf_fwp_version"] == hf_fwp.__version__


def _as_saved_by_another_version(folder: Path, dest: Path, version: str = "0.0.9") -> Path:
    """A copy of ``folder`` as another hf-fwp version would have written it (its code and config.json say so)."""
    shutil.copytree(folder, dest)
    code = (dest / "configuration_fwp.py").read_text()
    assert f'HF_FWP_VERSION = "{hf_fwp.__version__}"' in code
    (dest / "configuration_fwp.py").write_text(code.replace(hf_fwp.__version__, version, 1))
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "hf_fwp_version": version}))
    return dest


def test_a_folder_runs_its_own_code_even_when_hf_fwp_is_installed(saved, tmp_path):
    folder, model = saved["hybrid_sliding"]
    other = _as_saved_by_another_version(folder, tmp_path / "other")
    ids = torch.arange(3, 15)[None]
    result = load_in_fresh_process(other, ids, ids[:, :4], import_hf_fwp=True, modules_cache=tmp_path / "m")
    # No silent mix: every class of the loaded model comes from the folder's own files, not the installed package.
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert not [m for m in result["class_modules"] if m.startswith("hf_fwp")], result["class_modules"]
    assert result["hf_fwp_version"] == "0.0.9"
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(ids).logits, atol=1e-6, rtol=1e-5)
    # Identical code is not a mix: the installed classes run it.
    same = load_in_fresh_process(folder, ids, ids[:, :4], import_hf_fwp=True, modules_cache=tmp_path / "m")
    assert same["module"] == "hf_fwp.modeling.modeling_fwp"


def test_without_trust_remote_code_the_installed_code_runs_another_versions_folder_with_a_warning(saved, tmp_path):
    other = _as_saved_by_another_version(saved["delta"][0], tmp_path / "other")
    with pytest.warns(UserWarning, match="saved with other hf-fwp model code .* trust_remote_code=True"):
        model = AutoModelForCausalLM.from_pretrained(other)
    assert type(model) is hf_fwp.FWPForCausalLM


def test_a_config_from_another_version_warns_when_read_by_this_code():
    with pytest.warns(UserWarning, match="written by hf-fwp 0.0.1 .* trust_remote_code=True"):
        hf_fwp.FWPConfig(hf_fwp_version="0.0.1")
    assert hf_fwp.FWPConfig().to_dict()["hf_fwp_version"] == hf_fwp.__version__


def test_a_users_own_python_file_in_the_folder_is_not_taken_for_model_code(saved, tmp_path):
    folder = tmp_path / "with_script"
    shutil.copytree(saved["gated_delta"][0], folder)
    (folder / "train_more.py").write_text("print('my own script')\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is hf_fwp.FWPForCausalLM
