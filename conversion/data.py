"""Text data for distillation through ``datasets``: a Hub dataset name or local text / jsonl / parquet files,
tokenised and packed into fixed-length blocks with batched ``.map``."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_text(source: str | Path | list, *, split: str = "train", text_column: str = "text") -> Dataset:
    """Load raw text rows.

    ``source``: one or more local files (``.txt``/``.md``: one row per paragraph, i.e. split at blank lines, with
    the line breaks inside a paragraph kept; ``.jsonl``/``.json``/``.parquet``: rows with a ``text_column``) or a
    Hub dataset name (needs network).
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    paths = [Path(s) for s in sources]
    if all(p.exists() for p in paths):
        kinds = {_BUILDERS.get(p.suffix.lower()) for p in paths}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"Cannot read {[str(p) for p in paths]}: use files of one kind, with a suffix in "
                             f"{sorted(_BUILDERS)}.")
        empty = [str(p) for p in paths if p.is_file() and not p.read_bytes().strip()]
        if empty:
            raise ValueError(f"Data file(s) {empty} are empty: nothing to train or evaluate on.")
        try:
            kind = kinds.pop()
            # Paragraphs, not lines: pack() puts EOS between rows, which must not land inside a sentence.
            ds = load_dataset(kind, data_files=[str(p) for p in paths], split="train",
                              **({"sample_by": "paragraph"} if kind == "text" else {}))
        except Exception as e:  # datasets wraps parse errors (bad JSON lines, ...) in its own exception types
            cause = e.__cause__ or e
            raise ValueError(f"Cannot read {[str(p) for p in paths]} as {_BUILDERS[paths[0].suffix.lower()]} data: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    elif len(sources) == 1 and not any(sep in str(sources[0]) for sep in ("\\", ".txt", ".json", ".parquet")):
        from hf_fwp.conversion.hub import check_on_hub

        try:
            check_on_hub(str(sources[0]), "dataset")
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        ds = load_dataset(str(sources[0]), split=split)
    else:
        missing = [str(p) for p in paths if not p.exists()]
        raise ValueError(f"Data files not found: {missing}.")
    if text_column not in ds.column_names:
        raise ValueError(f"The data has no column {text_column!r}; its columns are {ds.column_names}. Pass "
                         "text_column=... .")
    return ds


def pack(ds: Dataset, tokenizer, block_size: int, *, text_column: str = "text", num_proc: int | None = None) -> Dataset:
    """Tokenise, concatenate (with EOS between documents) and cut into ``block_size`` blocks of ``input_ids``,
    ``attention_mask`` and ``labels``; the remainder shorter than a block is dropped."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    def has_text(batch):
        bad = [t for t in batch[text_column] if t is not None and not isinstance(t, str)]
        if bad:
            raise ValueError(f"The column {text_column!r} holds {type(bad[0]).__name__} values such as {bad[0]!r}, "
                             "not text: every row needs a string (or pass text_column=... / --text-column).")
        return [bool(t and t.strip()) for t in batch[text_column]]

    ds = ds.filter(has_text, batched=True, num_proc=num_proc)
    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenising")
    blocks = ds.map(group, batched=True, remove_columns=["ids"], num_proc=num_proc, desc="packing")
    if len(blocks) == 0:
        raise ValueError(f"The text is shorter than one block of {block_size} tokens: add text or use a smaller "
                         "block size.")
    return blocks
