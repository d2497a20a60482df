"""The embedded LDM's corpus at a glance: how often each style factor takes each value, and a grid per factor.

Reads the cached corpus (`build_corpus`, built on first use) and writes a dated report of factor frequencies,
caption statistics (distinct captions, tokens) and `docs/images/corpus_<factor>.png` (rows = the factor's values,
columns = random images with that value). Usage:

    .venv/bin/python benchmarks/ldm_corpus.py
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter

import numpy as np
import torch

from domainfusion.ldm.corpus import FACTORS, N_DEFAULT, build_corpus, split_corpus
from domainfusion.ldm.embedded import load_text_encoder
from domainfusion.ldm.grids import save_grid

from common import REPO, write_report

DOCS_IMAGES = REPO / "docs" / "images"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--n", type=int, default=N_DEFAULT)
    p.add_argument("--per-row", type=int, default=12, help="grid columns")
    a = p.parse_args()
    corpus = build_corpus(a.data_dir, n=a.n)
    train, held = split_corpus(corpus)
    rng = np.random.RandomState(0)
    lines = [
        f"{len(corpus.labels):,} images ({len(train.labels):,} for LDM training, the last {len(held.labels):,} "
        'held out), 32×32 RGB. Share of images per factor value ("-" = the factor\'s plain default, not named '
        "in the caption):",
        "",
        "| factor | values (share of all images) | grid |",
        "|---|---|---|",
    ]
    for factor in FACTORS:
        values = corpus.factors[factor]
        counts = Counter(values.tolist())
        shares = ", ".join(f"{v or '-'} {100 * c / len(values):.1f}%" for v, c in sorted(counts.items()))
        rows, labels = [], []
        for value in sorted(counts):
            pick = rng.choice(np.flatnonzero(values == value), size=min(a.per_row, counts[value]), replace=False)
            rows.append(torch.from_numpy(corpus.images[pick]).permute(0, 3, 1, 2).float() / 255)
            labels.append(f"{factor}: {value or '-'}")
        png = save_grid(rows, DOCS_IMAGES / f"corpus_{factor}.png", labels)
        lines.append(f"| {factor} | {shares} | `{png.relative_to(REPO)}` |")
    labels = Counter(corpus.labels.tolist())
    _, tokenizer = load_text_encoder()
    sample = rng.choice(len(corpus.captions), size=5000, replace=False)
    tokens = [len(tokenizer(corpus.captions[i])["input_ids"]) for i in sample]
    lines += [
        "",
        "Digits: " + ", ".join(f"{k} {100 * v / len(corpus.labels):.1f}%" for k, v in sorted(labels.items())),
        "",
        f"Captions: {len(set(train.captions)):,} distinct among the {len(train.captions):,} training "
        f"captions; tokens with [CLS]/[SEP] (5,000 sampled): mean {np.mean(tokens):.1f}, max {max(tokens)} "
        f"(context {tokenizer.model_max_length}).",
        "",
        "Examples:",
        "",
    ]
    lines += [f"- `{corpus.captions[i]}`" for i in sample[:8]]
    write_report("ldm-corpus", shlex.join([sys.executable, *sys.argv]), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
