"""Nearest-neighbour class scores from embeddings (metric learning: ``model.head: arcface | cosface``): shared by
the ``knn`` stage and the Kaggle bundle, so both score neighbours the same way.

A fold model's **index** is the embeddings of the rows it trained on, L2-normalised, with their classes. A
query's neighbours are the ``k`` index rows of highest cosine similarity; a class's score is the similarity
of its nearest neighbour among them, and the class probabilities are the softmax of ``scale`` x those scores
(classes without a neighbour get 0). A **new-individual** class (``new_class``, e.g. ``new_whale``) competes
with a fixed score, the threshold: a query whose nearest known neighbour is less similar than that is a new
one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def normalise(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


@dataclass
class Index:
    """The rows a fold model trained on: their normalised embeddings and classes."""
    embeddings: np.ndarray  # (rows, D) float, L2-normalised
    classes: np.ndarray  # (rows,) int
    ids: np.ndarray  # (rows,) the train ids of the rows: which images a neighbour is

    def __post_init__(self):  # kept (and saved) at half precision: a bundle searches the very same index
        self.embeddings = np.asarray(self.embeddings, dtype=np.float16).astype(np.float32)
        self.classes = np.asarray(self.classes, dtype=np.int64)
        self.ids = np.asarray(self.ids).astype(str)

    def save(self, path) -> None:
        with open(path, "wb") as f:  # (a file object: np.savez would add .npz to a temporary's name)
            np.savez(f, embeddings=self.embeddings.astype(np.float16), classes=self.classes, ids=self.ids)

    @classmethod
    def load(cls, path: str | Path) -> Index:
        with np.load(path) as z:
            return cls(z["embeddings"], z["classes"], z["ids"])

    def search(self, queries: np.ndarray, k: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row indices) of each query's ``k`` nearest index rows, most similar first; queries go
        in blocks of about 2**25 similarities (128 MiB) at a time."""
        q = normalise(queries)
        k = min(k, len(self.embeddings))
        block = block or max(1, min(4096, 2 ** 25 // max(len(self.embeddings), 1)))
        sims, rows = [], []
        for start in range(0, len(q), block):
            s = q[start:start + block] @ self.embeddings.T
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            rows.append(top)
            sims.append(np.take_along_axis(s, top, axis=1))
        return np.concatenate(sims), np.concatenate(rows)


def class_scores(sims: np.ndarray, classes: np.ndarray, n_classes: int, new_class: int | None = None,
                 threshold: float | None = None) -> np.ndarray:
    """(queries, classes): each class's best similarity among the neighbours (-inf without one); with a
    new-individual class, its score is at least ``threshold``."""
    score = np.full((len(sims), n_classes), -np.inf)
    rows = np.arange(len(sims))
    for j in range(sims.shape[1]):
        score[rows, classes[:, j]] = np.maximum(score[rows, classes[:, j]], sims[:, j])
    return with_threshold(score, new_class, threshold)


def with_threshold(score: np.ndarray, new_class: int | None, threshold: float | None) -> np.ndarray:
    """The scores with the new-individual class at least ``threshold`` (unchanged without one)."""
    if new_class is None or threshold is None:
        return score
    score = score.copy()
    score[:, new_class] = np.maximum(score[:, new_class], threshold)
    return score


def probabilities(score: np.ndarray, scale: float) -> np.ndarray:
    """Softmax of ``scale`` x scores over the classes that have one."""
    z = scale * score
    z = z - z.max(axis=1, keepdims=True)
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    return e / e.sum(axis=1, keepdims=True)


def predict(index: Index, queries: np.ndarray, k: int, scale: float, n_classes: int, new_class: int | None = None,
            threshold: float | None = None) -> np.ndarray:
    sims, rows = index.search(queries, k)
    return probabilities(class_scores(sims, index.classes[rows], n_classes, new_class, threshold), scale)


THRESHOLDS = np.round(np.linspace(-0.2, 1.0, 61), 3)


def tune_threshold(metric, y: np.ndarray, score: np.ndarray, scale: float, new_class: int) -> float:
    """The new-individual threshold that scores best on these rows: the middle of the best-scoring run of
    thresholds (as far from both kinds of mistake as these rows allow)."""
    sign = 1 if metric.higher_is_better else -1

    def value(t):
        return sign * metric(y, probabilities(with_threshold(score, new_class, t), scale))

    values = np.array([value(t) for t in THRESHOLDS])
    best = np.flatnonzero(np.isclose(values, values.max(), rtol=0, atol=1e-12))
    run = best[: np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1) + 1]  # the first run of best ones
    return float(THRESHOLDS[run[len(run) // 2]])
