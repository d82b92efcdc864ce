"""The offline corpus: several kinds of English text, held-out sets never trained on, no licence boilerplate."""

from __future__ import annotations

import pytest

from hf_fwp.conversion.corpus import KINDS, _LICENSE, drop_license_text, offline_corpus


def test_licence_paragraphs_are_dropped_and_prose_is_kept():
    text = ("A fast weight programmer writes its own weights.\n\nCopyright (c) 2024 Someone\n\n"
            "Permission is hereby granted, free of charge, to any person obtaining a copy\nof this software.\n\n"
            "It reads them with queries.")
    assert drop_license_text(text) == "A fast weight programmer writes its own weights.\n\nIt reads them with queries."


@pytest.fixture(scope="module")
def corpus():
    return offline_corpus()


def test_every_kind_has_a_held_out_set_that_is_never_trained_on(corpus):
    train, held = corpus
    assert list(held) == list(KINDS)
    training_text = set(train["text"])
    for kind, ds in held.items():
        assert sum(len(t) for t in ds["text"]) > 20_000, kind  # enough for dozens of evaluation blocks
        assert not training_text & set(ds["text"]), kind
    assert sum(len(t) for t in train["text"]) > 1_000_000


def test_no_licence_boilerplate_is_left(corpus):
    train, held = corpus
    for ds in (train, *held.values()):
        assert not [t for t in ds["text"] if _LICENSE.search(t)]
