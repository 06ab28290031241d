"""SST-2 reading and batching: parsing, where the data is looked for, dynamic padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynexec_compile import data
from dynexec_compile.data import (
    DATA_DIR_ENV,
    LengthGroupedBatchSampler,
    default_data_root,
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
