"""Experiments: the TOML files of ``experiments/`` run into tables and figures under ``results/``.

``bpfree experiment list | run NAME | render [NAME] | docs``. An experiment file (schema in :mod:`.spec`) names a
kind, each kind a module:

* ``train`` (:mod:`.train`): training runs, one table row per variant (x grid point), over seeds;
* ``toy`` (:mod:`.toy`): the feedback rules against a fixed target (REFERENCE question 5);
* ``estimate`` (:mod:`.estimate`): Jacobian estimate quality vs number of samples (question 4);
* ``bench`` (:mod:`.bench`): time and memory per step over depth and width (question 6);
* ``pipeline`` (:mod:`.pipeline`): measured per-block costs, and the step time and activation
  memory of BP (GPipe, 1F1B) and DFA pipelines predicted from them by :mod:`.pipeline_sim`.

:func:`run` (in :mod:`.runner`) skips finished jobs and resumes interrupted ones; :func:`render`
draws a results folder's table and figures again from its ``results.json``; published numbers are
data (:mod:`.published`); :func:`bpfree.experiment.docs.write` builds ``docs/results.md`` from the
results folders.
"""

from .runner import KIND_MODULES, job_status, plan, render, run
from .spec import KINDS, SCALES, Scale, Spec, discover, experiments_dir, find, load_spec

__all__ = ["KINDS", "KIND_MODULES", "SCALES", "Scale", "Spec", "discover", "experiments_dir", "find", "job_status",
           "load_spec", "plan", "render", "run"]
