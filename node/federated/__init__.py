"""Federated learning with Flower: the node's ClientApp, the coordinator's reference ServerApp,
enrollment, the approval-gated ClientApp executor and the SuperNode supervisor.

Every module here that imports ``flwr`` first calls :func:`node.federated.env.quiet_flower`, so
telemetry and update checks are off in every Flower process the node starts. Nothing outside
this package imports it (the DICOM receive path must not; import-linter checks that).
"""
