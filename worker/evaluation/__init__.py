"""Scoring models through the inference path: what a slide job's post-processing would find.

:mod:`~worker.evaluation.model` runs an exported model on outline-annotated images (and sweeps
post-processing settings), :mod:`~worker.evaluation.points` on point-annotated ones,
:mod:`~worker.evaluation.calibration` collects the class outcomes a calibration is fitted to, and
:mod:`~worker.evaluation.validation` scores a network in training as its card will post-process
(the validator ``hoverserve model train`` injects into :func:`models.train.loop.run_training`).
Every one segments through the family registry (:func:`worker.families.runner_for`) with the
card's typed options; the pure scoring (metrics, label-map matching) stays in :mod:`models`.

Import the submodules directly: :mod:`~worker.evaluation.validation` needs torch, the others
do not.
"""
