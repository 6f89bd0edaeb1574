"""Classification predictions: from the model's classification head, or from a language model that is
asked for the label (zero-shot, or K-shot with demonstrations: ``--shots``) and answers in text."""
from __future__ import annotations

import re

import torch

from ..data.collate import pad_id_for
from ..data.labels import label_vocab
from ..data.tokenize import tokenize_cls
from ..errors import ConfigError
from .metrics import normalize_answer
from .scoring import _batches, _device


def is_classifier(model) -> bool:
    return "SequenceClassification" in type(model).__name__


def label_names_for(inp) -> tuple[list[str], dict]:
    """The label names (the model's own when it has them, else from the rows) and raw label -> index."""
    try:
        return label_vocab(inp.rows, inp.label_names, "the evaluation data")
    except Exception as e:  # DataError from the label vocabulary: name the flag that fixes it
        raise ConfigError(f"{e} (give the label names with --label-names)") from None


def predict_classification(inp) -> list[dict]:
    names, mapping = label_names_for(inp)
    unknown = next(((loc, r["label"]) for loc, r in inp.rows if r["label"] not in mapping), None)
    if unknown:
        raise ConfigError(f"{unknown[0]}: label {unknown[1]!r} is not one of the model's labels {names}")
    if is_classifier(inp.model):
        if inp.demos:
            raise ConfigError("--shots: demonstrations are for language models answering in text; this model has a "
                              "classification head")
        return _by_head(inp, names, mapping)
    return _by_generation(inp, names, mapping)


@torch.no_grad()
def _by_head(inp, names: list[str], mapping: dict) -> list[dict]:
    model = inp.model.eval()
    k = int(model.config.num_labels)
    if k != len(names):
        raise ConfigError(f"the model's head has {k} labels but the data has {len(names)} ({names}); "
                          "give the model's label names in order with --label-names")
    out = tokenize_cls(inp.rows, inp.tokenizer, mapping, max_seq_len=inp.max_seq_len)
    records = []
    for start, batch in _batches(out.examples, inp.batch_size, pad_id_for(inp.tokenizer), _device(model),
                                 "classify", inp.progress):
        probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().softmax(-1)
        for j, p in enumerate(probs.tolist()):
            loc, row = inp.rows[start + j]
            records.append({"loc": loc, "text": row["text"], "label": names[mapping[row["label"]]],
                            "prediction": names[max(range(k), key=p.__getitem__)],
                            "probabilities": {n: round(v, 6) for n, v in zip(names, p)}})
    return records


def question(row: dict, names: list[str]) -> str:
    """The user turn asking for the label of ``row``."""
    text = f"Text: {row['text']}" + (f"\nSecond text: {row['text_pair']}" if row.get("text_pair") else "")
    return f"Classify the text as one of: {', '.join(names)}. Answer with the label only.\n\n{text}"


def match_label(text: str, names: list[str]) -> str | None:
    """The label a generated answer names: the one appearing first as a whole word (a longer name wins a
    tie), or None when it names none."""
    said = normalize_answer(text)
    best = None
    for n in names:
        m = re.search(rf"(?<!\w){re.escape(normalize_answer(n))}(?!\w)", said)
        if m and (best is None or (m.start(), -len(n)) < best[0]):
            best = ((m.start(), -len(n)), n)
    return None if best is None else best[1]


def _by_generation(inp, names: list[str], mapping: dict) -> list[dict]:
    from .generation import generate_answers
    demos = [[{"role": "user", "content": question(r, names)},
              {"role": "assistant", "content": names[mapping[r["label"]]]}] for _, r in (inp.demos or [])]
    shots = [m for pair in demos for m in pair]
    convs = [shots + [{"role": "user", "content": question(r, names)}] for _, r in inp.rows]
    answers = generate_answers(inp, convs, desc="classify")
    return [{"loc": loc, "text": r["text"], "label": names[mapping[r["label"]]], "answer": a,
             "prediction": match_label(a, names)} for (loc, r), a in zip(inp.rows, answers)]
