"""Task plugins: what a task accepts, how a study becomes a tensor, its model, its homomorphic
encryption (CKKS) input encoding and how its result is coded in a Structured Report.

``plugins`` builds on ``storage`` only and never imports ``node``; torch is imported lazily, where
a model is built (see :mod:`plugins.base`).
"""
