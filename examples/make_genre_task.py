"""Build a 4-class text-genre task from text already on this machine, as a TSV.

    python examples/make_genre_task.py runs/genre.tsv --per-class 1500

A classification task the demo model never saw, for trying ``early_exit_your_task.py`` where
no dataset can be downloaded. Each row is one sentence and where it came from:

    review     SST-2 training sentences (movie reviews; ``../shared/data/sst2/train.tsv``)
    python     Python's reference manual (the ``pydoc_data.topics`` help texts)
    license    the software licences of ``/usr/share/common-licenses`` (Debian)
    changelog  Debian package changelog entries (``/usr/share/doc/*/changelog.Debian.gz``)

Sentences of 5-40 words, duplicates dropped, ``--per-class`` sampled per class (seeded);
a class with fewer sentences keeps them all. Columns: ``text``, ``label``.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
from pathlib import Path

from dynexec_compile.data import load_sst2

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    out = []
    for piece in SENTENCE_END.split(" ".join(text.split())):
        words = piece.split()
        if 5 <= len(words) <= 40 and "\t" not in piece:
            out.append(" ".join(words))
    return out


def python_docs() -> list[str]:
    import pydoc_data.topics

    return [s for text in pydoc_data.topics.topics.values() for s in sentences(text)]


def licenses(root: Path = Path("/usr/share/common-licenses")) -> list[str]:
    return [s for path in sorted(root.iterdir()) if path.is_file() for s in sentences(path.read_text(errors="ignore"))]


def changelogs(root: Path = Path("/usr/share/doc")) -> list[str]:
    entries = []
    for path in sorted(root.glob("*/changelog.Debian.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="ignore")
        # "  * entry text" bullets, continuation lines joined
        for entry in re.findall(r"^\s+\* (.+(?:\n\s{4,}[^*\s].*)*)", text, flags=re.MULTILINE):
            entries += sentences(entry)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="TSV file to write")
    parser.add_argument("--per-class", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sources = {
        "review": [s for s, _ in load_sst2("train") if 5 <= len(s.split()) <= 40],
        "python": python_docs(),
        "license": licenses(),
        "changelog": changelogs(),
    }
    rng = random.Random(args.seed)
    rows = []
    for label, texts in sources.items():
        unique = sorted(set(texts))
        picked = rng.sample(unique, min(args.per_class, len(unique)))
        rows += [(text, label) for text in picked]
        print(f"{label}: {len(unique)} distinct sentences, {len(picked)} kept")
    rng.shuffle(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
