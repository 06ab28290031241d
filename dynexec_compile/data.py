"""Reading classification data (any CSV/TSV, a ``datasets`` dataset, SST-2) and batching it.

``load_classification`` turns a user's file or dataset into ``(text, label id)`` pairs and the
class names (string labels are mapped to ids, the mapping returned so that every split uses
the same one); ``classification_dataloader`` tokenises once and batches with dynamic padding,
optionally grouping texts of similar length (short texts that vary a lot, like SST-2's,
then pad roughly half as many tokens in a training epoch). ``load_sst2`` and
``sst2_dataloader`` are the same two for the GLUE SST-2 files the demo uses.

The SST-2 data lives outside the repository (it is never copied in): by default in
``<repo>/../shared/data``, or wherever the environment variable ``DYNEXEC_DATA_DIR`` points,
or wherever the caller says with ``root=``. A missing file raises an error that says where it
was expected, so a user knows what to download and where to put it.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
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

    The file is tab-separated with a header ``sentence<TAB>label`` and unquoted sentences
    (read by ``load_classification`` with SST-2's label ids ``0``/``1`` fixed).
    """
    path = sst2_path(split, root)
    if not path.is_file():
        raise FileNotFoundError(
            f"SST-2 {split} split not found: expected a file at {path} "
            f"(tab-separated 'sentence<TAB>label' with a header line). Put the GLUE SST-2 "
            f"{split}.tsv there, pass root=<folder holding sst2/>, or set {DATA_DIR_ENV}."
        )
    pairs, _ = load_classification(path, "sentence", "label", label_names=SST2_LABEL_NAMES)
    return pairs


# --- any classification data ---------------------------------------------------------------

DELIMITERS = {".tsv": "\t", ".csv": ","}
SST2_LABEL_NAMES = ("0", "1")


def load_classification(
    source: Any,
    text_column: str = "text",
    label_column: str = "label",
    *,
    delimiter: str | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[list[tuple[str, int]], list[str]]:
    """A classification dataset as ``(text, label id)`` pairs and the class names.

    Args:
        source: a CSV/TSV file with a header line (path), or a table read by column name:
            a Hugging Face ``datasets.Dataset`` (one split, e.g. ``load_dataset(...)["train"]``),
            a pandas DataFrame or a dict of equal-length lists.
        text_column, label_column: the columns holding the text and the label.
        delimiter: the file's field separator; default from its suffix (``.tsv`` tab,
            ``.csv`` comma). TSV fields are read unquoted (GLUE's convention: quotes are text),
            CSV fields with the usual double-quote quoting.
        label_names: the class names in id order, to read another split with the mapping
            the first one returned; a label outside it is an error.

    Returns:
        ``(pairs, label_names)``: ``label_names[i]`` is the name of class ``i``. Without
        ``label_names`` the classes are the distinct labels, sorted (numerically when every
        label is an integer, so ``0/1/2`` keep their ids and ``1..4`` become ``0..3``);
        a ``datasets`` ``ClassLabel`` column keeps its own ids and names.

    Raises:
        ValueError: a missing column (the message lists the ones there), an empty text or
            label (with its row), a label outside ``label_names``, fewer than 2 classes.
        FileNotFoundError: no file at ``source``.
    """
    if isinstance(source, (str, os.PathLike)):
        texts, labels, where = _read_table_file(Path(source), text_column, label_column, delimiter)
        class_names = None
    else:
        texts, labels, class_names = _read_table_object(source, text_column, label_column)
        where = [f"row {i}" for i in range(len(texts))]
    if class_names is not None and label_names is None:
        label_names = class_names
        labels = [class_names[int(label)] for label in labels]
    labels = [str(label).strip() for label in labels]
    for text, label, place in zip(texts, labels, where):
        if not str(text).strip() or not label:
            raise ValueError(f"{place}: empty {'text' if label else 'label'} in {text!r} / {label!r}")
    if label_names is None:
        label_names = _sorted_labels(set(labels))
    names = [str(name) for name in label_names]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(
            f"a classification dataset needs at least 2 distinct classes; got {names} "
            f"(label column {label_column!r})"
        )
    ids = {name: i for i, name in enumerate(names)}
    pairs = []
    for text, label, place in zip(texts, labels, where):
        if label not in ids:
            raise ValueError(
                f"{place}: label {label!r} is not one of the classes {names}; read every split with "
                "the label_names the first one returned"
            )
        pairs.append((str(text).strip(), ids[label]))
    return pairs, names


def _sorted_labels(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def _read_table_file(
    path: Path, text_column: str, label_column: str, delimiter: str | None
) -> tuple[list[str], list[str], list[str]]:
    """Texts, labels and ``file:line`` of each row of a delimited file with a header."""
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if delimiter is None:
        delimiter = DELIMITERS.get(path.suffix.lower())
        if delimiter is None:
            raise ValueError(
                f"{path}: cannot tell the delimiter from the suffix {path.suffix!r}; name the file "
                f".csv or .tsv or pass delimiter=','"
            )
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header line naming the columns")
        header = [name.strip() for name in header]
        columns = _column_indices(header, text_column, label_column, f"{path}: header")
        texts, labels, where = [], [], []
        for row in reader:
            if not row or row == [""]:
                continue
            place = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise ValueError(
                    f"{place}: {len(row)} fields, the header has {len(header)} "
                    f"({delimiter!r}-separated): {row!r}"
                )
            texts.append(row[columns[0]])
            labels.append(row[columns[1]])
            where.append(place)
    return texts, labels, where


def _column_indices(names: Sequence[str], text_column: str, label_column: str, what: str) -> tuple[int, int]:
    missing = [c for c in (text_column, label_column) if c not in names]
    if missing:
        raise ValueError(
            f"{what} has no column {' or '.join(map(repr, missing))}; its columns are {list(names)}: "
            "pass text_column= and label_column="
        )
    return list(names).index(text_column), list(names).index(label_column)


def _read_table_object(
    table: Any, text_column: str, label_column: str
) -> tuple[list[Any], list[Any], list[str] | None]:
    """Texts, labels and the ``ClassLabel`` names (or None) of a dataset / DataFrame / dict.

    Duck-typed, so ``datasets`` and pandas are not dependencies: a ``datasets.Dataset`` has
    ``column_names`` and ``features``, a DataFrame ``columns``, a dict its keys."""
    if hasattr(table, "column_names") and not isinstance(table.column_names, Sequence):
        raise TypeError(  # a DatasetDict: column_names is a dict of splits
            f"got a dataset with splits {list(table.column_names)}; pass one split, e.g. dataset['train']"
        )
    if hasattr(table, "column_names"):
        names = list(table.column_names)
    elif hasattr(table, "columns"):
        names = [str(c) for c in table.columns]
    elif isinstance(table, Mapping):
        names = list(table)
    else:
        raise TypeError(
            "load_classification: source must be a CSV/TSV path, a datasets.Dataset, a pandas DataFrame "
            f"or a dict of columns, got {type(table).__name__}"
        )
    _column_indices(names, text_column, label_column, f"the {type(table).__name__}")
    texts, labels = list(table[text_column]), list(table[label_column])
    if len(texts) != len(labels):
        raise ValueError(f"columns {text_column!r} and {label_column!r} differ in length: {len(texts)}, {len(labels)}")
    feature = (getattr(table, "features", None) or {}).get(label_column)
    class_names = list(feature.names) if getattr(feature, "names", None) else None
    return texts, labels, class_names


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


def classification_dataloader(
    tokenizer: Any,
    pairs: Sequence[tuple[str, int]],
    batch_size: int = 32,
    max_length: int = 64,
    shuffle: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """Tokenise ``(text, label id)`` pairs once; batches are dicts of padded tensors.

    Each batch holds ``input_ids: [B, S]``, ``attention_mask: [B, S]`` (and whatever else the
    tokenizer returns, e.g. ``token_type_ids``) padded on the right to the longest text of
    the batch (dynamic padding), and ``labels: [B]``; texts are cut at ``max_length`` tokens.
    ``group_by_length`` batches texts of similar length (``LengthGroupedBatchSampler``).
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


def sst2_dataloader(
    tokenizer: Any,
    pairs: Sequence[tuple[str, int]] | str = "train",
    batch_size: int = 32,
    max_length: int = 64,
    shuffle: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> torch.utils.data.DataLoader:
    """``classification_dataloader`` over SST-2: ``pairs`` is a split name (read with
    ``load_sst2(split, root)``) or ``(sentence, label)`` pairs already read."""
    if isinstance(pairs, str):
        pairs = load_sst2(pairs, root)
    return classification_dataloader(
        tokenizer, pairs, batch_size, max_length, shuffle, group_by_length, seed
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
