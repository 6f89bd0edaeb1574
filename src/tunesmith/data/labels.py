"""Classification label vocabularies."""

from __future__ import annotations

from .errors import DataError, short


def _as_int(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def label_vocab(rows, label_names: list[str] | None, source: str) -> tuple[list[str], dict]:
    """``(label_names, raw label -> id)`` for the train ``rows`` (``(loc, row)`` pairs).

    With ``label_names``: labels are names from it, or ints 0..K-1 indexing it. Otherwise all
    ints (or strings that all parse as ints) are used as-is and must cover 0..K-1; strings are
    sorted. Mixed kinds are an error.
    """
    if label_names is not None:
        names = list(label_names)
        mapping: dict = {n: i for i, n in enumerate(names)}
        mapping.update({i: i for i in range(len(names))})
        mapping.update({str(i): i for i in range(len(names))})
        return names, mapping
    raw = {row["label"] for _, row in rows}
    ints = {v: _as_int(v) for v in raw}
    if all(i is not None for i in ints.values()):
        present = set(ints.values())
        if min(present) < 0:
            loc, row = next((loc, r) for loc, r in rows if ints[r["label"]] < 0)
            raise DataError(f"{loc}: field 'label' has value {short(row['label'])}, expected a "
                            "class index >= 0 (or set data.label_names)")
        k = max(present) + 1
        missing = sorted(set(range(k)) - present)
        if missing:
            raise DataError(
                f"{source}: integer labels must cover 0..{k - 1} but {missing[:20]} never occur "
                f"(found {sorted(present)[:20]}); set data.label_names to name the classes"
            )
        return [str(i) for i in range(k)], {**ints, **{i: i for i in range(k)}, **{str(i): i for i in range(k)}}
    if any(isinstance(v, int) for v in raw):
        loc = next(loc for loc, r in rows if isinstance(r["label"], int))
        raise DataError(f"{loc}: field 'label' mixes int and str values across {source}; "
                        "use one kind or set data.label_names")
    names = sorted(raw)
    return names, {n: i for i, n in enumerate(names)}


def check_labels(rows, mapping: dict, names: list[str], known: str) -> tuple[list, list[str]]:
    """Rows whose label is in ``mapping``, and error messages for the others."""
    good, bad = [], []
    for loc, row in rows:
        if row["label"] in mapping:
            good.append((loc, row))
        else:
            bad.append(f"{loc}: field 'label' has value {short(row['label'])}, which is not "
                       f"{known}; known labels: {names}")
    return good, bad
