"""Check influence predictions against exact retraining of the CRF head.

Removing a training segment's conditional loss from the mean over ``N``
training sentences changes a test segment's conditional loss by about
``(1/N) g_testᵀ H⁻¹ g_train``. This module compares that prediction with
the change measured after refitting the head without the training segment.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.stats
from tqdm.auto import tqdm

from segflu_core.influence.head import HeadParams, Segment, check_segment, head_objective, refit_head, segment_losses
from segflu_core.influence.hessian import solve
from segflu_core.influence.scores import segment_gradient

logger = logging.getLogger(__name__)

COLUMNS = [
    "test_sentence",
    "test_start",
    "test_end",
    "train_sentence",
    "train_start",
    "train_end",
    "predicted",
    "actual",
    "iterations",
    "max_abs_gradient",
]

# A starting point counts as a minimum when max|∇J| is within this factor of
# the refitting tolerance, because the retrained heads are compared with it.
MINIMUM_SLACK = 10.0


def _gradients(params: HeadParams, features, labels, items: Sequence[Segment]) -> np.ndarray:
    """Return ``∇θ CL`` of each item as rows, shape ``(K, P)``."""
    rows = [segment_gradient(features[s], labels[s], params, a, b).flatten() for s, a, b in items]
    return np.stack(rows)


def exact_influence_check(
    params: HeadParams,
    train_features,
    train_labels,
    test_items: Sequence[Segment],
    train_items: Sequence[Segment],
    *,
    l2: float,
    test_features=None,
    test_labels=None,
    hessian_factor: np.ndarray | None = None,
    tolerance: float = 1e-6,
    max_iterations: int = 500,
    progress: bool = True,
) -> pd.DataFrame:
    """Compare predicted and actual changes of test losses when training segments are removed.

    Parameters
    ----------
    params : HeadParams
        A minimum of the head objective on the training sentences, as
        returned by :func:`refit_head` with the same ``l2`` and ``tolerance``.
    train_features, train_labels : sequences of np.ndarray
        Training sentences, shapes ``(n_i, d)`` and ``(n_i,)``.
    test_items, train_items : sequences of (sentence, start, end)
        Segments ``[start, end)``. Test items index ``test_features`` and
        ``test_labels``, or the training sentences when those are None.
    l2 : float
        Weight ``λ`` of the ``(λ/2)‖θ‖²`` penalty used for ``params``.
    test_features, test_labels : sequences of np.ndarray or None
        Sentences of the test items, for example a validation split.
    hessian_factor : np.ndarray or None
        Lower Cholesky factor of ``H = ∇²J`` at ``params``; None uses
        ``H = I``, which only ranks.
    tolerance, max_iterations : float, int
        Passed to :func:`refit_head` for each retraining, which also uses
        ``hessian_factor`` as its preconditioner.
    progress : bool
        Show a tqdm progress bar over retrainings.

    Returns
    -------
    pandas.DataFrame
        One row per (test item, train item) pair with the columns in
        ``COLUMNS``. ``predicted`` is ``(1/N) g_testᵀ H⁻¹ g_train``,
        ``actual`` is the test conditional loss after refitting without the
        train item minus the loss at ``params``. Each train item is refitted
        once and shared by all test items.

    Raises
    ------
    ValueError
        If ``params`` is not a minimum: ``max|∇J| > MINIMUM_SLACK · tolerance``.
    """
    if test_features is None:
        test_features, test_labels = train_features, train_labels
    test_items = [check_segment(item, test_features) for item in test_items]
    train_items = [check_segment(item, train_features) for item in train_items]
    _check_minimum(params, train_features, train_labels, l2=l2, tolerance=tolerance)

    num_sentences = len(train_features)
    # shape: (K_test, P) and (K_train, P)
    test_gradients = _gradients(params, test_features, test_labels, test_items)
    train_gradients = _gradients(params, train_features, train_labels, train_items)
    queries = test_gradients if hessian_factor is None else solve(hessian_factor, test_gradients.T).T
    # shape: (K_test, K_train)
    predicted = queries @ train_gradients.T / num_sentences
    base_losses = segment_losses(params, test_features, test_labels, test_items)

    records = []
    unique_items = list(dict.fromkeys(train_items))
    retrained = {}
    for item in tqdm(unique_items, desc="Retraining", disable=not progress):
        refitted, info = refit_head(
            params,
            train_features,
            train_labels,
            l2=l2,
            tolerance=tolerance,
            max_iterations=max_iterations,
            removed=[item],
            preconditioner=hessian_factor,
        )
        changes = segment_losses(refitted, test_features, test_labels, test_items) - base_losses
        retrained[item] = (changes, info)
    for j, item in enumerate(train_items):
        changes, info = retrained[item]
        for i, test_item in enumerate(test_items):
            records.append((*test_item, *item, predicted[i, j], changes[i], info["iterations"], info["max_abs_gradient"]))
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def _check_minimum(params: HeadParams, features, labels, *, l2: float, tolerance: float) -> None:
    _, gradient = head_objective(params, features, labels, l2=l2)
    max_abs_gradient = float(np.abs(gradient.flatten()).max())
    if max_abs_gradient > MINIMUM_SLACK * tolerance:
        raise ValueError(
            f"expected params at a minimum of the head objective (max|gradient| <= {MINIMUM_SLACK * tolerance:.3g}), "
            f"got max|gradient| = {max_abs_gradient:.3g}; refit the head with refit_head first"
        )


def correlation_summary(frame: pd.DataFrame) -> dict:
    """Summarise how well predicted changes match actual ones.

    Returns
    -------
    dict
        ``pearson`` and ``spearman`` correlations, ``sign_agreement`` (the
        share of pairs whose predicted and actual changes have the same sign)
        and ``n`` (the number of pairs). Correlations are NaN with fewer than
        two pairs or a constant column.
    """
    for column in ("predicted", "actual"):
        if column not in frame.columns:
            raise ValueError(f"expected a frame with a {column!r} column, got columns {list(frame.columns)}")
    predicted = frame["predicted"].to_numpy(dtype=np.float64)
    actual = frame["actual"].to_numpy(dtype=np.float64)
    count = len(predicted)
    varied = count >= 2 and np.ptp(predicted) > 0 and np.ptp(actual) > 0
    return {
        "pearson": float(scipy.stats.pearsonr(predicted, actual)[0]) if varied else float("nan"),
        "spearman": float(scipy.stats.spearmanr(predicted, actual)[0]) if varied else float("nan"),
        "sign_agreement": float(np.mean(np.sign(predicted) == np.sign(actual))) if count else float("nan"),
        "n": count,
    }
