"""Synthetic CT corpora: built once from fixed seeds, cached, and given fresh UIDs for every run.

Every UID of a template file starts with one marker (root + a fixed-width token). A run replaces the
marker with one of the same length holding a new random token, byte for byte: element lengths do not
change, so the files stay valid, and no target ever sees a resend it could deduplicate (the grid and
Orthanc both recognise known SOP Instance UIDs; storescp would overwrite a file of the same name).
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from bench.paths import CORPUS_CACHE, send_dir

FORMAT_VERSION = 1
# pydicom's UID root, under which pydicom users may mint UIDs, then a 12-digit token per run.
UID_ROOT = "1.2.826.0.1.3680043.8.498"
TEMPLATE_TOKEN = "100000000000"


def _marker(token: str) -> bytes:
    return f"{UID_ROOT}.{token}.".encode()


def uid(token: str, kind: int, *numbers: int) -> str:
    """``ROOT.TOKEN.KIND.N...``: kind 1 study, 2 series, 3 instance, 4 frame of reference."""
    return ".".join([UID_ROOT, token, str(kind), *map(str, numbers)])


@dataclass(frozen=True)
class CorpusSpec:
    """One corpus: ``count`` CT images of ``rows`` x ``columns`` 16-bit pixels in ``studies`` studies."""

    name: str
    count: int
    rows: int
    columns: int
    studies: int
    seed: int

    @property
    def cache_dir(self) -> Path:
        return CORPUS_CACHE / (
            f"v{FORMAT_VERSION}-{self.name}-{self.count}x{self.rows}x{self.columns}-{self.studies}st-seed{self.seed}"
        )


def _ct_image(spec: CorpusSpec, index: int, rng: random.Random) -> Dataset:
    """One CT slice with the header a scanner would send (patient, study, series, geometry)."""
    per_study = -(-spec.count // spec.studies)
    study, slice_no = index // per_study + 1, index % per_study + 1
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid(TEMPLATE_TOKEN, 3, index + 1)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240315"
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.ContentTime = f"1015{slice_no % 60:02d}"
    ds.AccessionNumber = f"ACC{spec.seed}{study:04d}"
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH"
    ds.ReferringPhysicianName = "Referrer^Bench"
    ds.StudyDescription = f"CT CHEST {spec.name.upper()}"
    ds.SeriesDescription = "AXIAL 1.25"
    ds.PatientName = f"Bench^Patient{study:03d}"
    ds.PatientID = f"BENCH-{spec.name.upper()}-{study:03d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.StudyInstanceUID = uid(TEMPLATE_TOKEN, 1, study)
    ds.SeriesInstanceUID = uid(TEMPLATE_TOKEN, 2, study)
    ds.StudyID = str(study)
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = slice_no
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-1.25 * slice_no:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uid(TEMPLATE_TOKEN, 4, study)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.PixelSpacing = ["0.976562", "0.976562"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = rng.randbytes(spec.rows * spec.columns * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class Corpus:
    """The template files of one spec, held in memory (at most a few tens of MB)."""

    def __init__(self, spec: CorpusSpec, files: list[bytes]) -> None:
        self.spec = spec
        self.files = files

    @classmethod
    def load(cls, spec: CorpusSpec) -> "Corpus":
        """Read the cached templates, building them first if the cache is missing or stale."""
        manifest = spec.cache_dir / "manifest.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("spec") != asdict(spec):
            cls._build(spec)
        names = json.loads(manifest.read_text())["files"]
        return cls(spec, [(spec.cache_dir / name).read_bytes() for name in names])

    @staticmethod
    def _build(spec: CorpusSpec) -> None:
        shutil.rmtree(spec.cache_dir, ignore_errors=True)
        spec.cache_dir.mkdir(parents=True)
        rng = random.Random(spec.seed)
        names = []
        for index in range(spec.count):
            name = f"{index:05d}.dcm"
            _ct_image(spec, index, rng).save_as(spec.cache_dir / name, enforce_file_format=True)
            names.append(name)
        # Written last: a build that was interrupted leaves no manifest and is redone.
        (spec.cache_dir / "manifest.json").write_text(json.dumps({"spec": asdict(spec), "files": names}, indent=1))

    @property
    def total_bytes(self) -> int:
        return sum(len(f) for f in self.files)

    def materialize(self, parts: int, limit: int | None = None) -> "RunCorpus":
        """Copies of the first ``limit`` files (default all) with fresh UIDs, split into ``parts``."""
        token = str(secrets.randbelow(9 * 10**11) + 10**11)
        while token == TEMPLATE_TOKEN:
            token = str(secrets.randbelow(9 * 10**11) + 10**11)
        old, new = _marker(TEMPLATE_TOKEN), _marker(token)
        files = self.files[:limit] if limit else self.files
        directory = send_dir(f"dicomgrid-bench-{self.spec.name}-")
        paths = []
        for index, data in enumerate(files):
            path = directory / f"{index:05d}.dcm"
            path.write_bytes(data.replace(old, new))
            paths.append(path)
        bounds = [round(k * len(paths) / parts) for k in range(parts + 1)]
        split = [paths[bounds[k]: bounds[k + 1]] for k in range(parts) if bounds[k] < bounds[k + 1]]
        studies = sorted({self.key(token, i).study_uid for i in range(len(files))})
        last = [self.key(token, bounds[k + 1] - 1) for k in range(parts) if bounds[k] < bounds[k + 1]]
        return RunCorpus(directory, token, split, sum(len(f) for f in files), studies, last)

    def key(self, token: str, index: int) -> "InstanceKey":
        """The UIDs of file ``index`` in the run whose UIDs carry ``token``."""
        per_study = -(-self.spec.count // self.spec.studies)
        study = index // per_study + 1
        return InstanceKey(uid(token, 1, study), uid(token, 2, study), uid(token, 3, index + 1))


@dataclass(frozen=True)
class InstanceKey:
    study_uid: str
    series_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class RunCorpus:
    """One run's files: ``parts`` (one per association), their total size, study UIDs, and the
    instance each association sends last (what the index-lag probe waits for)."""

    directory: Path
    token: str  # in every UID of the run: study n is uid(token, 1, n), its series uid(token, 2, n)
    parts: list[list[Path]]
    total_bytes: int
    study_uids: list[str]
    last: list[InstanceKey]

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.parts)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
