"""The de-identification tables under schemas/deidentification/ are what the generator makes of PS3.15.

The byte-for-byte check needs the standard's DocBook (part15.xml, NEMA; SHA-256 recorded in the tables):
``DICOMGRID_PART15_XML=path``, or the file at ``.standards/part15.xml`` in the checkout or
``standards/part15.xml`` in the shared folder beside it. The other tests run without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dicomgrid.trials import standard
from dicomgrid.trials.profile import Profile, table_entry

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "schemas" / "deidentification"


def _part15() -> Path | None:
    candidates = [os.environ.get("DICOMGRID_PART15_XML"), ROOT / ".standards" / "part15.xml",
                  ROOT.parent / "shared" / "standards" / "part15.xml"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _committed(name: str) -> dict:
    return json.loads((TABLES / name).read_text("utf-8"))


def test_tables_are_what_the_generator_makes_of_part15():
    source = _part15()
    if source is None:
        pytest.skip("PS3.15 part15.xml not available (see the module docstring)")
    generated = standard.generate(source)
    for name, text in generated.items():
        assert (TABLES / name).read_text("utf-8") == text, f"{name} differs from what the generator makes of {source}"
        assert json.loads(text)["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


# A DocBook fragment in the standard's shape: header labels with their olinks, one row per attribute.
_OLINK = ' (from <olink targetdoc="PS3.6"/>)'
_HEAD = "".join(f"<th><para>{label}{_OLINK if i in (2, 3) else ''}</para></th>"
                for i, (label, _) in enumerate(standard.PROFILE_COLUMNS))
_NS = 'xmlns="http://docbook.org/ns/docbook" xmlns:xml="http://www.w3.org/XML/1998/namespace"'


def _row(*cells: str) -> str:
    return "<tr>" + "".join(f"<td><para>{c}</para></td>" if c else "<td/>" for c in cells) + "</tr>"


def _document(head: str, rows: list[str]) -> bytes:
    safe = ('<table xml:id="table_E.3.10-1"><caption>Safe Private Attributes</caption><thead><tr>'
            + "".join(f"<th><para>{label}</para></th>" for label, _ in standard.SAFE_PRIVATE_COLUMNS)
            + "</tr></thead><tbody>" + _row("(7053,xx00)", "Philips PET Private Group", "DS", "1", "SUV Factor")
            + "</tbody></table>")
    return (f'<book {_NS}><info><subtitle>DICOM PS3.15 2099z - Security</subtitle></info>'
            f'<table xml:id="table_E.1-1"><caption>Application Level Confidentiality Profile Attributes</caption>'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{safe}</book>').encode()


_ROWS = [
    _row("Study Date", "(0008,0020)", "N", "Y", "Z", "", "", "", "", "", "K", "C", "", "", ""),
    _row("Patient\u200b's Name", "(0010,0010)", "N", "Y", "Z", *[""] * 10),
    _row("Overlay Data", "(60xx,3000)", "N", "Y", "X", *[""] * 9, "C"),
    _row("Private Attributes", "(gggg,eeee) where gggg is odd", "N", "Y", "X", "C", *[""] * 9),
]


def test_generator_reads_columns_by_their_labels(monkeypatch):
    monkeypatch.setattr(standard, "MIN_PROFILE_ROWS", 1)
    table = standard.profile_table(_document(_HEAD, _ROWS))
    by_tag = {row["tag"]: row for row in table["attributes"]}
    assert by_tag["00080020"] == {"tag": "00080020", "name": "Study Date", "retired": False, "in_std_iod": True,
                                  "basic": "Z", "options": {"retain_longitudinal_full_dates": "K",
                                                            "retain_longitudinal_modified_dates": "C"}}
    assert by_tag["00100010"]["name"] == "Patient's Name"
    assert by_tag["60xx3000"]["options"] == {"clean_graphics": "C"}
    assert by_tag["private"]["options"] == {"retain_safe_private": "C"}
    assert table["source"]["document"] == "DICOM PS3.15 2099z - Security"
    assert table["source"]["sha256"] == hashlib.sha256(_document(_HEAD, _ROWS)).hexdigest()
    safe = standard.safe_private_table(_document(_HEAD, _ROWS))["attributes"]
    assert safe == [{"group": "7053", "element": "00", "creator": "Philips PET Private Group", "vr": "DS", "vm": "1",
                     "meaning": "SUV Factor"}]


def test_generator_refuses_reordered_columns_and_unknown_codes(monkeypatch):
    monkeypatch.setattr(standard, "MIN_PROFILE_ROWS", 1)
    labels = [label for label, _ in standard.PROFILE_COLUMNS]
    labels[9], labels[10] = labels[10], labels[9]
    swapped = "".join(f"<th><para>{label}</para></th>" for label in labels)
    with pytest.raises(standard.TableError, match="unexpected columns"):
        standard.profile_table(_document(swapped, _ROWS))
    bad = [_row("Study Date", "(0008,0020)", "N", "Y", "Q", *[""] * 10)]
    with pytest.raises(standard.TableError, match="unknown action code"):
        standard.profile_table(_document(_HEAD, bad))


def test_committed_table_holds_the_standard_rows():
    table = _committed(standard.PROFILE_TABLE)
    assert table["source"]["document"].startswith("DICOM PS3.15 ")
    assert len(table["attributes"]) >= standard.MIN_PROFILE_ROWS
    # Rows as PS3.15 Table E.1-1 states them.
    assert table_entry(0x00100010).basic == "Z"  # Patient's Name
    assert table_entry(0x00100020).basic == "Z/D"  # Patient ID
    assert table_entry(0x00080018).basic == "U"  # SOP Instance UID
    study_date = table_entry(0x00080020)
    assert (study_date.basic, study_date.options) == (
        "Z", {"retain_longitudinal_full_dates": "K", "retain_longitudinal_modified_dates": "C"})
    assert table_entry(0x60023000).name == "Overlay Data"  # a repeating group: 6002 is in 6000-601E
    assert table_entry(0x60213000) is None  # odd groups do not repeat
    assert table_entry(0x50100010).basic == "X"  # curves


def test_options_override_the_basic_profile():
    assert Profile().action_for(0x00080020) == "Z"
    assert Profile(("retain-longitudinal-modified-dates",)).action_for(0x00080020) == "C"
    assert Profile(("retain-longitudinal-full-dates",)).action_for(0x00080020) == "K"
    assert Profile(("retain-device-identity",)).action_for(0x00181000) == "K"  # Device Serial Number
    assert Profile().action_for(0x00181000) == "X/Z/D"
    assert Profile(("retain-safe-private",)).action_for(0x00091001) == "C"
    assert Profile().action_for(0x00091001) == "X"
