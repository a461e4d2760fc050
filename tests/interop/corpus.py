"""The sample corpus of the interop tests: pydicom's bundled test files and the pydicom-data package.

A file belongs to the corpus when pydicom reads it without ``force`` and it has a Part 10 file meta with
a Transfer Syntax UID, i.e. when a PACS could hold it as a DICOM file. Together the two sources cover a
dozen transfer syntaxes, multi-frame images, non-ASCII character sets, private tags and a few files that
are broken on purpose (truncated, invalid UIDs).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
from pydicom import dcmread

# The storescu option that proposes each transfer syntax first (the grid accepts the first proposed
# syntax it supports, so every file of a group travels in its own transfer syntax, never converted).
STORESCU_OPTIONS = {
    "1.2.840.10008.1.2": "-xi",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "-xe",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": "-xb",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
}


@dataclass(frozen=True)
class Sample:
    """One corpus file; ``label`` ("pydicom:CT_small.dcm") names it in expectations and reports."""

    label: str
    path: Path
    transfer_syntax: str
    sop_instance_uid: str  # "" when the data set has none

    @property
    def instance_key(self) -> str:
        """What the grid versions the file under: its SOP Instance UID (or, lacking one, the file)."""
        return self.sop_instance_uid or self.label


def sample_sources() -> dict[str, Path]:
    """The folders the corpus is read from, by source name.

    pydicom-data's files are located through its installed distribution: pydicom's own lookup
    (``get_testdata_files``) also tries to download files it does not find, and there is no network here.
    """
    pydicom_data = importlib.metadata.distribution("pydicom-data").locate_file("data_store/data")
    return {
        "pydicom": Path(pydicom.data.__file__).parent / "test_files",
        "pydicom-data": Path(str(pydicom_data)),
    }


def _read_sample(label: str, path: Path) -> Sample | None:
    with warnings.catch_warnings():
        # Several files are deliberately odd (invalid UIDs, truncated pixel data); pydicom warns.
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path)
        except Exception:  # not DICOM, no preamble, no file meta: not a Part 10 file pydicom can read
            return None
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
        sop_instance_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not transfer_syntax:
        return None
    return Sample(label, path, str(transfer_syntax), sop_instance_uid)


def load_corpus() -> list[Sample]:
    """Every readable Part 10 file of both sources, in a stable order."""
    samples = []
    for source, root in sample_sources().items():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            sample = _read_sample(f"{source}:{path.relative_to(root).as_posix()}", path)
            if sample is not None:
                samples.append(sample)
    return samples
