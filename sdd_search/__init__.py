"""sdd-search: Scale Decoupled Distillation, with its knobs found by search.

The maths (:mod:`sdd_search.sdd`), the models (:mod:`sdd_search.models`), the data
(:mod:`sdd_search.data`) and one distillation run (:func:`sdd_search.train.run_trial`) need no
Ray; :mod:`sdd_search.search` and the ``sdd-search`` command add Ray Tune, Ray Train and MLflow.
"""

__version__ = "0.1.0"
