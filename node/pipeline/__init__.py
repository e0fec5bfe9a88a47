"""Job handlers, one module per job kind.

The framework they plug into (kinds, typed payloads, :func:`node.jobs.register`, sweeps,
lanes) is :mod:`node.jobs`; this package holds only the stages of the pipeline:

- :mod:`node.pipeline.deidentify`: a received instance → de-identified blob + vault;
- :mod:`node.pipeline.assemble`: the sweep that completes quiet studies and queues ``infer``;
- :mod:`node.pipeline.report`: a result → TID 1500 SR in the encrypted outbox (+ its sweep);
- :mod:`node.pipeline.export`: a report → C-STORE to one destination.

Nothing outside the worker imports this package (an import-linter contract keeps
:mod:`node.tasks` and :mod:`node.runtime` out of it).
"""
