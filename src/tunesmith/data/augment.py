"""EDA text augmentation for classification (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for
Boosting Performance on Text Classification Tasks").

Each training row gets ``num_aug`` extra copies, each made by one of four operations on its words (``n`` =
the number of words, ``k = max(1, round(α·n))``), in turn: synonym replacement (``k`` distinct non-stop words
that have synonyms, each replaced by one of them: ``alpha_sr``), random insertion (a synonym of a random word,
``k`` times, at random places: ``alpha_ri``), random swap (two random words exchanged, ``k`` times:
``alpha_rs``) and random deletion (each word dropped with probability ``p_rd``, at least one kept). Synonyms
come from the small bundled list in data/synonyms.py. Only the training rows are augmented, after the
validation split; row ``i``'s copies are drawn from a generator seeded with ``(seed, i)``, so a run is
reproducible.
"""
from __future__ import annotations

import random

from .synonyms import STOP_WORDS, SYNONYMS


def _has_synonyms(word: str) -> bool:
    return word.lower() not in STOP_WORDS and word.lower() in SYNONYMS


def synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    candidates = sorted({w for w in words if _has_synonyms(w)})
    rng.shuffle(candidates)
    for word in candidates[:n]:
        choice = rng.choice(SYNONYMS[word.lower()])
        out = [choice if w == word else w for w in out]
    return out


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    candidates = [w for w in words if _has_synonyms(w)]
    for _ in range(n if candidates else 0):
        out.insert(rng.randint(0, len(out)), rng.choice(SYNONYMS[rng.choice(candidates).lower()]))
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(n if len(out) > 1 else 0):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


def eda(text: str, cfg, rng: random.Random) -> list[str]:
    """``cfg.num_aug`` augmented versions of ``text`` (the operations in turn)."""
    words = text.split()
    n = len(words)
    ops = [lambda w: synonym_replacement(w, max(1, round(cfg.alpha_sr * n)), rng),
           lambda w: random_insertion(w, max(1, round(cfg.alpha_ri * n)), rng),
           lambda w: random_swap(w, max(1, round(cfg.alpha_rs * n)), rng),
           lambda w: random_deletion(w, cfg.p_rd, rng)]
    return [" ".join(ops[k % 4](words)) for k in range(cfg.num_aug)]


def augment_rows(rows: list[tuple[str, dict]], cfg, seed: int) -> list[tuple[str, dict]]:
    """``rows`` (``(loc, canonical row)`` pairs), each followed by its EDA copies (``text`` changed)."""
    out = []
    for i, (loc, row) in enumerate(rows):
        out.append((loc, row))
        rng = random.Random(f"eda:{seed}:{i}")
        for k, text in enumerate(eda(row["text"], cfg, rng), start=1):
            out.append((f"{loc} (eda copy {k})", {**row, "text": text}))
    return out
