"""Teacher metadata read for the model card (no network)."""

from __future__ import annotations

import pytest

from hf_fwp.conversion.hub import teacher_license


def test_the_license_comes_from_a_local_teachers_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# a teacher\n")
    assert teacher_license(str(tmp_path)) == "mit"
    (tmp_path / "README.md").write_text("# a card without metadata\n")
    assert teacher_license(str(tmp_path)) is None
    assert teacher_license(str(tmp_path / "missing-folder")) is None


def test_the_license_comes_from_a_gguf_files_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "teacher.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert teacher_license(str(path)) == "apache-2.0"


def test_a_license_other_keeps_its_name_and_link(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: acme-1\nlicense_link: LICENSE\n---\n# t\n")
    assert teacher_license(str(tmp_path)) == {"license": "other", "license_name": "acme-1", "license_link": "LICENSE"}
    (tmp_path / "LICENSE").write_text("Acme terms\n")
    assert teacher_license(str(tmp_path))["license_file"] == str(tmp_path / "LICENSE")
