"""The reference task: frontal chest radiographs (DX/CR, PA/AP) → pneumonia (SNOMED CT
233604007) probability. See :class:`plugins.chest_xray.task.ChestXrayTask`."""

from plugins.chest_xray.task import ChestXrayTask

__all__ = ["ChestXrayTask"]
