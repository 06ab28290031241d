"""Reading classification data (any CSV/TSV or dataset, SST-2) and batching it: parsing, label
mapping, where the data is looked for, dynamic padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynexec_compile import data
from dynexec_compile.data import (
    DATA_DIR_ENV,
    LengthGroupedBatchSampler,
    classification_dataloader,
    default_data_root,
    load_classification,
    load_sst2,
    sst2_dataloader,
    sst2_path,
)

TSV = 'sentence\tlabel\nit \'s a "charming" film . \t1\nunflinchingly bleak\t0\n\n'


def write_sst2(root, split="validation", text=TSV):
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    (root / "sst2" / f"{split}.tsv").write_text(text, encoding="utf-8")


def test_load_sst2_parses_sentences_with_quotes(tmp_path):
    write_sst2(tmp_path)
    assert load_sst2("validation", tmp_path) == [
        ('it \'s a "charming" film .', 1),
        ("unflinchingly bleak", 0),
    ]


def test_environment_variable_sets_the_data_folder(tmp_path, monkeypatch):
    write_sst2(tmp_path, "train")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_root() == tmp_path
    assert len(load_sst2("train")) == 2


def test_default_root_is_shared_data_next_to_the_repo(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    repo = Path(data.__file__).resolve().parents[1]
    assert sst2_path("train") == repo.parent / "shared" / "data" / "sst2" / "train.tsv"


def test_missing_file_says_where_it_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sst2" / "train.tsv")):
        load_sst2("train", tmp_path)


def test_bad_split_header_and_label_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid splits: train, validation"):
        load_sst2("test", tmp_path)
    write_sst2(tmp_path, text="text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="header"):
        load_sst2("validation", tmp_path)
    write_sst2(tmp_path, text="sentence\tlabel\nfine\t2\n")
    with pytest.raises(ValueError, match=r"validation.tsv:2"):
        load_sst2("validation", tmp_path)


@pytest.mark.skipif(
    not sst2_path("validation").is_file(), reason="needs SST-2 under ../shared/data"
)
def test_real_sst2_has_the_glue_sizes():
    train, validation = load_sst2("train"), load_sst2("validation")
    assert (len(train), len(validation)) == (67349, 872)
    assert {label for _, label in validation} == {0, 1}


class CharTokenizer:
    """One token per character, enough to test batching without a vocabulary."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        ids = [[ord(c) for c in text][:max_length] for text in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}


PAIRS = [("a" * n, n % 2) for n in range(1, 42)]


def test_dataloader_pads_each_batch_to_its_longest_sentence():
    loader = sst2_dataloader(CharTokenizer(), PAIRS, batch_size=4, max_length=32)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 4)  # lengths 1..4
    assert batch["attention_mask"].sum(-1).tolist() == [1, 2, 3, 4]
    assert batch["input_ids"][0].tolist() == [97, 0, 0, 0]
    assert batch["labels"].tolist() == [1, 0, 1, 0]
    longest = max(b["input_ids"].shape[1] for b in loader)
    assert longest == 32  # truncated at max_length


def test_length_grouping_visits_every_sentence_once_in_fewer_padded_tokens():
    lengths = [len(sentence) for sentence, _ in PAIRS]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, shuffle=True, seed=0, window=3)
    first, second = list(sampler), list(sampler)
    assert sorted(i for b in first for i in b) == list(range(len(PAIRS)))
    assert first != second  # a new order every epoch
    assert list(LengthGroupedBatchSampler(lengths, 4, shuffle=True, seed=0, window=3)) == first
    assert len(sampler) == len(first) == 11

    grouped = sst2_dataloader(CharTokenizer(), PAIRS, 4, 64, shuffle=True, group_by_length=True)
    plain = sst2_dataloader(CharTokenizer(), PAIRS, 4, 64, shuffle=True)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in plain)
    labels = torch.cat([b["labels"] for b in grouped])
    assert sorted(labels.tolist()) == sorted(label for _, label in PAIRS)


# --- any classification data ---------------------------------------------------------------


def test_csv_and_tsv_with_string_labels_map_to_ids_and_return_the_mapping(tmp_path):
    (tmp_path / "news.csv").write_text(
        'headline,topic,source\n"Stocks fall, again",business,a\nGoal!,sport,b\n'
        'New chip,tech,c\n"He said ""no""",business,d\n',
        encoding="utf-8",
    )
    pairs, names = load_classification(tmp_path / "news.csv", "headline", "topic")
    assert names == ["business", "sport", "tech"]
    assert pairs == [("Stocks fall, again", 0), ("Goal!", 1), ("New chip", 2), ('He said "no"', 0)]
    # the same mapping for another split, even when a class is absent there
    (tmp_path / "dev.tsv").write_text('topic\theadline\ntech\ta "quoted" chip\n', encoding="utf-8")
    assert load_classification(tmp_path / "dev.tsv", "headline", "topic", label_names=names) == (
        [('a "quoted" chip', 2)], names,
    )
    (tmp_path / "bad.tsv").write_text("topic\theadline\nweather\train\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2: label 'weather' is not one of"):
        load_classification(tmp_path / "bad.tsv", "headline", "topic", label_names=names)


def test_integer_labels_keep_their_order(tmp_path):
    (tmp_path / "d.tsv").write_text("text\tlabel\na\t10\nb\t2\nc\t1\n", encoding="utf-8")
    pairs, names = load_classification(tmp_path / "d.tsv")
    assert names == ["1", "2", "10"] and [label for _, label in pairs] == [2, 1, 0]


def test_bad_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\na\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'sentence'.*columns are \['text', 'label'\]"):
        load_classification(path, "sentence", "label")
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        load_classification(path)
    (tmp_path / "d.txt").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="delimiter"):
        load_classification(tmp_path / "d.txt")
    assert load_classification(tmp_path / "d.txt", delimiter=",", label_names=["0", "1"]) == ([], ["0", "1"])
    path.write_text("text\tlabel\na\t0\tx\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.tsv:2: 3 fields, the header has 2"):
        load_classification(path)
    path.write_text("text\tlabel\n \t0\nb\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.tsv:2: empty text"):
        load_classification(path)
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_classification(tmp_path / "none.csv")


class FakeClassLabel:
    names = ["neg", "neu", "pos"]


class FakeDataset:
    """Duck-typed like a ``datasets.Dataset``: column_names, features, dataset[column]."""

    column_names = ["sentence", "label", "idx"]
    features = {"label": FakeClassLabel(), "sentence": object()}

    def __getitem__(self, column):
        return {"sentence": ["meh", "great", "awful"], "label": [1, 2, 0], "idx": [0, 1, 2]}[column]


class FakeDatasetDict:
    column_names = {"train": ["sentence", "label"]}


def test_datasets_objects_and_dicts_are_read_by_column():
    pairs, names = load_classification(FakeDataset(), "sentence", "label")
    assert names == ["neg", "neu", "pos"] and pairs == [("meh", 1), ("great", 2), ("awful", 0)]
    assert load_classification({"text": ["x", "y"], "label": ["b", "a"]}) == ([("x", 1), ("y", 0)], ["a", "b"])
    with pytest.raises(TypeError, match=r"pass one split, e.g. dataset\['train'\]"):
        load_classification(FakeDatasetDict(), "sentence")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['sentence', 'label', 'idx'\]"):
        load_classification(FakeDataset())


def test_generic_dataloader_serves_any_number_of_classes():
    pairs = [("a" * n, n % 5) for n in range(1, 12)]
    labels = torch.cat([b["labels"] for b in classification_dataloader(CharTokenizer(), pairs, batch_size=4)])
    assert labels.tolist() == [label for _, label in pairs]


def test_sst2_dataloader_reads_a_split_by_name(tmp_path):
    write_sst2(tmp_path)
    batch = next(iter(sst2_dataloader(CharTokenizer(), "validation", batch_size=2, root=tmp_path)))
    assert batch["labels"].tolist() == [1, 0]
