"""Task metrics: SQuAD-style exact match and token F1, accuracy, per-class and macro F1, ROUGE-L."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation (ASCII and Unicode) and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(c for c in text if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generated answer gives: the answer itself after normalisation ("Positive." is
    positive), else the one label it mentions as a whole word; None when it names none or several."""
    norm = normalize_answer(text)
    by_norm = {normalize_answer(lab): lab for lab in labels}
    if norm in by_norm:
        return by_norm[norm]
    words = f" {norm} "
    named = [lab for n, lab in by_norm.items() if n and f" {n} " in words]
    return named[0] if len(named) == 1 else None


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 after normalisation; two empty answers match (1.0), one empty gives 0.0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens (longest common subsequence)."""
    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@dataclass
class ClassReport:
    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # precision, recall, f1, support
    confusion: list[list[int]] = field(default_factory=list)  # rows: reference, columns: predicted


def classification_report(predictions: list[str], references: list[str], labels: list[str]) -> ClassReport:
    """Accuracy, per-class precision/recall/F1 (0 where undefined), macro F1 and the confusion matrix."""
    index = {lab: i for i, lab in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for p, r in zip(predictions, references, strict=True):
        confusion[index[r]][index[p]] += 1
    per_class = {}
    for lab, i in index.items():
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    n = len(references)
    accuracy = sum(confusion[i][i] for i in range(len(labels))) / n if n else 0.0
    present = [lab for lab in labels if per_class[lab]["support"] > 0] or labels
    macro = sum(per_class[lab]["f1"] for lab in present) / len(present)
    return ClassReport(labels, accuracy, macro, per_class, confusion)
