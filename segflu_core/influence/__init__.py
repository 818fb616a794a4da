"""Segment influence for the CRF head: math kernels, exact Hessian and retraining checks.

The public kernels live in :mod:`.head` (parameters, objective, refitting),
:mod:`.scores` (closed-form influence of words, spans and sentences),
:mod:`.hessian` (exact Hessian and Cholesky solves) and :mod:`.retrain`
(comparison with exact retraining).
"""
