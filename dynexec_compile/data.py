"""Readers for the small datasets the examples and benchmarks use (SST-2).

``sst2_dataloader`` tokenises once and batches with dynamic padding, optionally grouping
sentences of similar length (SST-2 sentences are short and vary a lot, so this roughly
halves the padded tokens of a training epoch).

The data lives outside the repository (it is never copied in): by default in
``<repo>/../shared/data``, or wherever the environment variable ``DYNEXEC_DATA_DIR`` points,
or wherever the caller says with ``root=``. A missing file raises an error that says where it
was expected, so a user knows what to download and where to put it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

SST2_SPLITS = ("train", "validation")
DATA_DIR_ENV = "DYNEXEC_DATA_DIR"


def default_data_root() -> Path:
    """The data folder: ``$DYNEXEC_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"


def sst2_path(split: str, root: str | os.PathLike | None = None) -> Path:
    """Where ``load_sst2`` reads ``split`` from: ``<root>/sst2/<split>.tsv``."""
    if split not in SST2_SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; valid splits: {', '.join(SST2_SPLITS)}")
    base = Path(root) if root is not None else default_data_root()
    return base / "sst2" / f"{split}.tsv"


def load_sst2(split: str = "train", root: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """Read SST-2 (GLUE) as a list of ``(sentence, label)`` pairs, label 0 = negative, 1 = positive.

    Args:
        split: ``"train"`` (67,349 sentences) or ``"validation"`` (872 sentences).
        root: the data folder holding ``sst2/<split>.tsv``; defaults to ``$DYNEXEC_DATA_DIR``
            or ``<repo>/../shared/data``.

    The file is tab-separated with a header ``sentence<TAB>label``; the sentence is everything
    before the last tab (sentences are not quoted, so no CSV parsing that would eat quotes).
    """
    path = sst2_path(split, root)
    if not path.is_file():
        raise FileNotFoundError(
            f"SST-2 {split} split not found: expected a file at {path} "
            f"(tab-separated 'sentence<TAB>label' with a header line). Put the GLUE SST-2 "
            f"{split}.tsv there, pass root=<folder holding sst2/>, or set {DATA_DIR_ENV}."
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["sentence", "label"]:
        raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {lines[:1]!r}")
    return [
        _parse_line(path, number, line) for number, line in enumerate(lines[1:], start=2) if line
    ]


def _parse_line(path: Path, number: int, line: str) -> tuple[str, int]:
    sentence, sep, label = line.rpartition("\t")
    if not sep or label not in ("0", "1"):
        raise ValueError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line!r}")
    return sentence.strip(), int(label)


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length, so dynamic padding pads little (SST-2 lengths vary 3..60).

    With ``shuffle``: each epoch shuffles the indices, sorts them by length inside windows of
    ``window`` batches, cuts batches and shuffles the batch order (a new order per epoch,
    reproducible from ``seed``). Without: batches in order of decreasing length.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        window: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.window = window
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
            yield from _chunks(order, self.batch_size)
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches: list[list[int]] = []
        for window in _chunks(order, self.batch_size * self.window):
            window.sort(key=lambda i: -self.lengths[i])
            batches.extend(_chunks(window, self.batch_size))
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def sst2_dataloader(
    tokenizer: Any,
    pairs: Sequence[tuple[str, int]],
    batch_size: int = 32,
    max_length: int = 64,
    shuffle: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """Tokenise ``(sentence, label)`` pairs once; batches are dicts of padded tensors.

    Each batch holds ``input_ids: [B, S]``, ``attention_mask: [B, S]`` (and whatever else the
    tokenizer returns, e.g. ``token_type_ids``) padded on the right to the longest sentence of
    the batch (dynamic padding), and ``labels: [B]``.
    """
    encoded = tokenizer([sentence for sentence, _ in pairs], truncation=True, max_length=max_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    features = [
        {**{key: encoded[key][i] for key in keys}, "labels": label}
        for i, (_, label) in enumerate(pairs)
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = functools.partial(_pad_batch, keys=keys, pad_id=pad_id)
    if group_by_length:
        lengths = [len(feature["input_ids"]) for feature in features]
        sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle, seed)
        return torch.utils.data.DataLoader(features, batch_sampler=sampler, collate_fn=collate)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        features, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )


def _pad_batch(
    features: list[dict[str, Any]], keys: list[str], pad_id: int
) -> dict[str, torch.Tensor]:
    longest = max(len(feature["input_ids"]) for feature in features)
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    batch = {
        key: torch.tensor([f[key] + [pad_values[key]] * (longest - len(f[key])) for f in features])
        for key in keys
    }  # each: [B, S]
    batch["labels"] = torch.tensor([f["labels"] for f in features])  # [B]
    return batch
