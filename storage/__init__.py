"""Persistence only: engine and sessions, typed models, migrations, the job queue, the blob
store and the encrypted spool. Imports neither ``node`` nor ``plugins``."""
