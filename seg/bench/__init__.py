"""Benchmarks against the machine's limit: each figure a ratio of two measurements of one run.

Parts (``scripts/bench.py --parts ...``):

* ``step`` (:mod:`seg.bench.step`): training-step FLOP/s against the matmul peak of the same
  device and threads, and the engine's per-step overhead against a bare step;
* ``loader`` (:mod:`seg.bench.loader`): the data pipeline's samples/s against what
  training consumes, the share of training time spent waiting for data, a per-stage
  breakdown and measured alternatives;
* ``parallel`` (:mod:`seg.bench.parallel`): 2 one-thread trials against 1 two-thread trial
  (on CUDA: trials sharing one GPU);
* ``harness`` and ``search`` (:mod:`seg.tuning.bench`, which may import Ray, Optuna and
  MLflow): a search's wall time against training the same trials directly, and TPE with
  ASHA against random search at equal budgets of trial-epochs.

:mod:`seg.bench.report` holds the figures and writes them as Markdown and JSON;
:mod:`seg.bench.machine` describes the machine and measures its matmul peak. Nothing
here imports Ray, Optuna or MLflow, and nothing runs on import.
"""
