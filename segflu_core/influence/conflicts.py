"""Flag returned training items whose annotation disagrees with a similar item.

Each returned item is described by one or more words ("units"): a word item by
itself, an entity span by its text and mean feature, a sentence by each of its
words. Two units are similar when their lowercased text is equal or the cosine
similarity of their features is at least :data:`COSINE_THRESHOLD`. An item is
in conflict when one of its units is similar to a unit of an item on the other
side, a supporting item against an opposing one, and the two units' gold label
types differ. ``PER`` against ``LOC`` differ, and so do ``O`` and ``PER``. Such pairs point at
inconsistent annotation: the same or a near-identical word was labelled two
ways and pulls the prediction in opposite directions. Nearest-neighbour
results have no sides, so there every other returned item counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cosine similarity of word features at or above which two differently written
# words count as the same word for conflict detection.
COSINE_THRESHOLD = 0.8


@dataclass(frozen=True)
class ConflictUnits:
    """Words that describe the returned items, flattened over items.

    Attributes
    ----------
    item : numpy.ndarray
        int64, shape (num_units,): index of the returned item each unit belongs to.
    forms : list[str]
        Lowercased text of each unit.
    features : numpy.ndarray
        float32, shape (num_units, d).
    types : numpy.ndarray
        int64, shape (num_units,): gold label type index of each unit.
    """

    item: np.ndarray
    forms: list[str]
    features: np.ndarray
    types: np.ndarray


def similar_units(units: ConflictUnits, *, threshold: float = COSINE_THRESHOLD) -> np.ndarray:
    """Return which pairs of units count as the same word.

    Returns
    -------
    numpy.ndarray
        bool, shape (num_units, num_units).
    """
    features = np.asarray(units.features, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(features, axis=1), np.finfo(np.float32).tiny)
    unit_vectors = features / norms[:, None]
    # shape: (num_units, num_units)
    cosine = unit_vectors @ unit_vectors.T
    forms = np.array(units.forms, dtype=object)
    same_form = forms[:, None] == forms[None, :]
    return same_form | (cosine >= threshold)


def flag_conflicts(
    units: ConflictUnits,
    sides: np.ndarray,
    *,
    threshold: float = COSINE_THRESHOLD,
) -> np.ndarray:
    """Flag items with a similar, differently labelled unit on another side.

    Parameters
    ----------
    units : ConflictUnits
        Words of the returned items.
    sides : numpy.ndarray
        int, shape (num_items,): -1 for supporting, +1 for opposing and 0 for
        nearest neighbours. Two items are compared when their sides differ or
        when both are neighbours; an item is never compared with itself.
    threshold : float
        Cosine similarity at or above which two units are similar.

    Returns
    -------
    numpy.ndarray
        bool, shape (num_items,): ``True`` for items in conflict.
    """
    sides = np.asarray(sides)
    conflict = np.zeros(len(sides), dtype=bool)
    if len(units.item) == 0:
        return conflict
    item = np.asarray(units.item, dtype=np.int64)
    similar = similar_units(units, threshold=threshold)
    types = np.asarray(units.types)
    differ = types[:, None] != types[None, :]
    unit_sides = sides[item]
    both_neighbours = (unit_sides[:, None] == 0) & (unit_sides[None, :] == 0)
    compared = (unit_sides[:, None] != unit_sides[None, :]) | both_neighbours
    compared &= item[:, None] != item[None, :]
    # shape: (num_units,)
    unit_conflict = (similar & differ & compared).any(axis=1)
    np.logical_or.at(conflict, item, unit_conflict)
    return conflict
