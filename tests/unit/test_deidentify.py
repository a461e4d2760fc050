"""The de-identifier against every sample file of pydicom and pydicom-data.

For each file and each option set, every attribute of the original that Table E.1-1 lists (at the top
level and inside sequences the profile keeps) is checked against the action the committed table gives it
under those options; the expectations are computed here from the table and the key, independently of the
engine. Then the whole output is searched for the original patient's name, ID and birth date and for every
original UID that is not a well-known UID of the standard: none may survive, anywhere.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import hmac
import io
import json
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomgrid.trials.engine import REDACTED, Deidentifier, identifying_pixels, method_description
from dicomgrid.trials.profile import OPTIONS, Profile
from dicomgrid.trials.pseudonyms import Pseudonyms

KEY = hashlib.sha256(b"test trial key").digest()
TABLE = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "deidentification" / "table-e1-1.json")
                   .read_text("utf-8"))
ROWS = {row["tag"]: row for row in TABLE["attributes"]}
OPTION_SETS = {
    "basic": (),
    "longitudinal": ("retain-longitudinal-modified-dates", "retain-patient-characteristics", "retain-device-identity",
                     "clean-descriptors", "retain-safe-private"),
    "full-dates": ("retain-longitudinal-full-dates", "retain-institution-identity"),
}


def _sample_files() -> list[Path]:
    pydicom_files = glob.glob(str(Path(pydicom.data.__file__).parent / "test_files" / "**" / "*.dcm"), recursive=True)
    try:
        import data_store  # pydicom-data

        more = glob.glob(str(Path(data_store.__file__).parent / "data" / "*.dcm"))
    except ImportError:
        more = []
    usable = []
    for name in sorted(set(pydicom_files + more)):
        try:
            ds = pydicom.dcmread(name)
            if "TransferSyntaxUID" in ds.file_meta and ds.get("SOPClassUID") and ds.get("SOPInstanceUID"):
                usable.append(Path(name))
        except Exception:  # deliberately broken test files: the grid refuses them at ingest
            continue
    return usable


FILES = _sample_files()


# -- expectations, from the table and the key --------------------------------------------------------


def expected_action(tag: int, options: tuple[str, ...]) -> str | None:
    group, element = tag >> 16, tag & 0xFFFF
    row = ROWS.get(f"{tag:08X}")
    if row is None and group % 2 == 0 and 0x5000 <= group <= 0x501E:
        row = ROWS["50xxxxxx"]
    if row is None and group % 2 == 0 and 0x6000 <= group <= 0x601E:
        row = ROWS.get(f"60xx{element:04X}")
    if row is None:
        return None
    overrides = [row["options"][OPTIONS[o].column] for o in options if OPTIONS[o].column in row["options"]]
    if overrides:
        return "C" if "C" in overrides else overrides[0]
    return {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}.get(row["basic"], row["basic"])


def pseudonym_uid(uid: str) -> str:
    raw = bytearray(hmac.new(KEY, b"uid\x00" + uid.strip().encode(), hashlib.sha256).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return f"2.25.{int.from_bytes(raw, 'big')}"


def day_shift(patient: str) -> int:
    n = int.from_bytes(hmac.new(KEY, b"date-shift\x00" + patient.encode(), hashlib.sha256).digest()[:8], "big")
    return -(365 + n % 3286)


def values(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def shifted(value: str, days: int) -> str | None:
    try:
        return (dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) + dt.timedelta(days=days)).strftime("%Y%m%d")
    except ValueError:
        return None


class Checker:
    def __init__(self, options: tuple[str, ...], original: Dataset) -> None:
        self.options = options
        patient_id = str(original.get("PatientID", "") or "").strip()
        self.patient = patient_id or f"study:{original.get('StudyInstanceUID', '')}"
        self.days = day_shift(self.patient)
        self.checked: Counter[str] = Counter()

    def dataset(self, original: Dataset, out: Dataset, path: str) -> None:
        for elem in original:
            tag = elem.tag
            if tag.group in (0x0002, 0x0004) or tag.is_private:
                continue
            action = expected_action(int(tag), self.options)
            if action is None:
                continue
            where = f"{path}{elem.keyword or tag}"
            self.checked[f"{int(tag):08X} {action}"] += 1
            if action == "X":
                assert tag not in out, f"{where}: X, still present"
                continue
            assert tag in out, f"{where}: {action}, missing"
            got = out[tag]
            if elem.VR == "SQ":
                if action == "Z":
                    assert len(got.value) == 0, f"{where}: Z, sequence not emptied"
                else:
                    assert len(got.value) == len(elem.value), where
                    for i, (a, b) in enumerate(zip(elem.value, got.value)):
                        self.dataset(a, b, f"{where}[{i}].")
                continue
            self.element(elem, got, action, where)

    def element(self, elem, got, action: str, where: str) -> None:
        before, after = values(elem.value), values(got.value)
        if action == "K":
            assert after == before, f"{where}: K, changed"
        elif action == "Z":
            if elem.keyword == "PatientName":
                assert str(got.value).startswith("T1-"), f"{where}: patient name is not the pseudonym"
            else:
                assert after == [], f"{where}: Z, not empty: {after!r}"
        elif action == "D":
            assert after, f"{where}: D, empty"
            if elem.VR == "UI":
                assert after == [pseudonym_uid(str(v)) for v in before] or (not before and after), where
            elif before and elem.VR not in ("DA", "DT", "TM", "DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "CS",
                                            "AS", "OB", "OW", "UN"):
                assert not set(map(str, after)) & set(map(str, before)), f"{where}: D, original kept"
        elif action == "U":
            assert after == [pseudonym_uid(str(v)) for v in before], f"{where}: U, not the keyed pseudonym"
        elif action == "C":
            if elem.VR in ("DA", "DT") and "retain-longitudinal-modified-dates" in self.options:
                want = [s + (str(v)[8:] if elem.VR == "DT" else "") for v in before
                        if (s := shifted(str(v)[:8], self.days)) is not None]
                assert after == want, f"{where}: C, not shifted by the patient's {self.days} days"
            elif elem.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE") and "clean-descriptors" in self.options:
                assert len(after) == len(before), where
                for a, b in zip(after, before):
                    assert str(a) == str(b) or REDACTED in str(a), f"{where}: C, changed without a redaction"
            else:
                assert after == before, f"{where}: C under options that keep it, changed"


def _strings(ds: Dataset):
    """Every value in the data set as text, private and nested ones included (bytes decoded as latin-1)."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            continue
        for value in values(elem.value):
            yield value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _original_uids(ds: Dataset) -> set[str]:
    found = set()
    for elem in ds.iterall():
        if elem.VR == "UI":
            found.update(str(v) for v in values(elem.value) if str(v) not in UID_dictionary and len(str(v)) > 8)
    return found


def _deidentify(path: Path, options: tuple[str, ...]) -> tuple[Dataset, Dataset, bytes]:
    engine = Deidentifier(Profile(options), Pseudonyms(KEY, "T1"), method_description("T1"))
    original = pydicom.dcmread(path)
    data = engine.deidentify_bytes(str(path))
    return original, pydicom.dcmread(io.BytesIO(data)), data


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_every_table_attribute_of_the_samples_gets_its_action(option_set):
    options = OPTION_SETS[option_set]
    assert len(FILES) > 100, "the sample corpus is missing"
    total: Counter[str] = Counter()
    for path in FILES:
        original, out, _ = _deidentify(path, options)
        checker = Checker(options, original)
        checker.dataset(original, out, f"{path.name}: ")
        total.update(checker.checked)
        assert out.PatientIdentityRemoved == "YES"
        codes = [(item.CodeValue, item.CodingSchemeDesignator) for item in out.DeidentificationMethodCodeSequence]
        assert codes == [("113100", "DCM"), *((OPTIONS[o].code, "DCM") for o in OPTIONS if o in options)]
        assert out.LongitudinalTemporalInformationModified == (
            "MODIFIED" if "retain-longitudinal-modified-dates" in options
            else "UNMODIFIED" if "retain-longitudinal-full-dates" in options else "REMOVED")
        if "PixelData" in original:
            assert out.PixelData == original.PixelData, f"{path.name}: pixel data changed"
        assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    distinct = {key.split()[0] for key in total}
    # The samples exercise a good part of the table, and every kind of action.
    assert len(distinct) >= 60, sorted(distinct)
    kinds = {key.split()[1] for key in total}
    assert kinds >= {"X", "Z", "D", "U"} | ({"K"} if options else set()) | (
        {"C"} if "clean-descriptors" in options else set()), kinds


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_no_original_identity_survives_anywhere(option_set):
    options = OPTION_SETS[option_set]
    for path in FILES:
        original, out, data = _deidentify(path, options)
        texts = list(_strings(out))
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(original.get(keyword, "") or "").strip()
            if not value:
                continue
            if keyword == "PatientBirthDate" and "retain-longitudinal-full-dates" in options:
                # Full Dates keeps the study's own dates, which may fall on the birth date by chance.
                others = {t for e in original.iterall() if e.VR == "DA" and e.keyword != keyword
                          for t in map(str, values(e.value))}
                if value in others:
                    continue
            # Short values also occur inside unrelated values (an ID "0010" in the dummy date "19000101").
            survived = [t for t in texts if (value in t if len(value) >= 6 else value == t.strip())]
            assert not survived, f"{path.name}: {keyword} {value!r} survived in {survived[:3]}"
        for uid in _original_uids(original):
            assert not any(uid in text for text in texts), f"{path.name}: original UID {uid} survived"
            assert uid.encode() not in data, f"{path.name}: original UID {uid} is in the written file"
        if "retain-safe-private" not in options:
            assert not any(elem.tag.is_private for elem in out.iterall()), f"{path.name}: private attribute kept"


def test_private_attributes_kept_only_when_listed_safe():
    ds = Dataset()
    ds.PatientID = "P1"
    ds.add_new(0x70530010, "LO", "Philips PET Private Group")
    ds.add_new(0x70531000, "DS", "1.5")  # (7053,xx00) SUV Factor: Table E.3.10-1
    ds.add_new(0x70531001, "LO", "Doe^Jane")  # not listed
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "LO", "P1")
    engine = Deidentifier(Profile(("retain-safe-private",)), Pseudonyms(KEY, "T1"), "m")
    out = engine.deidentify(ds)
    assert out[0x70530010].value == "Philips PET Private Group" and out[0x70531000].value == "1.5"
    assert 0x70531001 not in out and 0x00090010 not in out and 0x00091001 not in out


def test_clean_descriptors_removes_the_patients_identity_from_text():
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN12345"
    ds.StudyDescription = "CT chest abdomen - Jane Doe MRN12345"
    ds.SeriesDescription = "AX 5mm"
    engine = Deidentifier(Profile(("clean-descriptors",)), Pseudonyms(KEY, "T1"), "m")
    out = engine.deidentify(ds)
    assert out.StudyDescription == f"CT chest abdomen - {REDACTED} {REDACTED} {REDACTED}"
    assert out.SeriesDescription == "AX 5mm"


def test_pseudonyms_are_keyed_and_stable():
    one, again, other = Pseudonyms(KEY, "T1"), Pseudonyms(KEY, "T1"), Pseudonyms(b"\x01" * 32, "T1")
    assert one.uid("1.2.3") == again.uid("1.2.3") == pseudonym_uid("1.2.3")
    assert one.uid("1.2.3") != other.uid("1.2.3") and one.uid("1.2.3") != one.uid("1.2.4")
    assert len(one.uid("1.2.3")) <= 64 and one.patient_id("P1") == again.patient_id("P1") != other.patient_id("P1")
    # Every date of one patient moves by the same number of days: intervals between studies stay.
    engine = Deidentifier(Profile(("retain-longitudinal-modified-dates",)), one, "m")
    first, second = Dataset(), Dataset()
    for ds, date in ((first, "20200105"), (second, "20200317")):
        ds.PatientID, ds.StudyDate = "P1", date
        engine.deidentify(ds)
    gap = dt.datetime.strptime(second.StudyDate, "%Y%m%d") - dt.datetime.strptime(first.StudyDate, "%Y%m%d")
    assert gap.days == 72 and first.StudyDate != "20200105"


def test_instances_that_may_show_identity_are_recognised():
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    assert identifying_pixels(ds) is None
    ds.BurnedInAnnotation = "YES"
    assert "Burned In Annotation" in identifying_pixels(ds)
    for sop_class in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.77.1.4",
                      "1.2.840.10008.5.1.4.1.1.104.1"):
        assert identifying_pixels(Dataset(SOPClassUID=sop_class) if False else _with_class(sop_class)), sop_class


def _with_class(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = uid
    return ds
