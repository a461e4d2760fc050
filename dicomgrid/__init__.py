"""dicomgrid: an event-streaming data grid that archives and distributes DICOM studies across sites."""

__version__ = "0.1.0"
