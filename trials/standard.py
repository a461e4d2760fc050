"""The de-identification tables, generated from the standard's own DocBook source (PS3.15 part15.xml).

Two tables of PS3.15 Annex E are kept as data under ``schemas/deidentification/``:

* ``table-e1-1.json``: Table E.1-1, the action of the Basic Application Level Confidentiality Profile
  and of every option column for each attribute;
* ``safe-private.json``: Table E.3.10-1, the private attributes the Retain Safe Private Option may keep.

They are written by this module, never by hand::

    python -m dicomgrid.trials.standard path/to/part15.xml

The source is NEMA's DocBook (``https://dicom.nema.org/medical/dicom/current/source/docbook/part15/part15.xml``);
its edition and SHA-256 are recorded in each table, and ``tests/unit/test_deid_table.py`` regenerates
the tables from the same file and requires them byte for byte. The columns are read by their header
labels, which are checked, so a reordered table in a later edition fails here instead of silently
mapping an option to the wrong column.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

DOCBOOK = "{http://docbook.org/ns/docbook}"
XML_ID = "{http://www.w3.org/XML/1998/namespace}id"
SOURCE_URL = "https://dicom.nema.org/medical/dicom/current/source/docbook/part15/part15.xml"
TABLES_DIR = Path(__file__).resolve().parent.parent / "schemas" / "deidentification"
PROFILE_TABLE = "table-e1-1.json"
SAFE_PRIVATE_TABLE = "safe-private.json"

# Table E.1-1, column by column: (label the header starts with, key in the generated table).
PROFILE_COLUMNS = (
    ("Attribute Name", "name"),
    ("Tag", "tag"),
    ("Retd.", "retired"),
    ("In Std. Comp. IOD", "in_std_iod"),
    ("Basic Prof.", "basic"),
    ("Rtn. Safe Priv. Opt.", "retain_safe_private"),
    ("Rtn. UIDs Opt.", "retain_uids"),
    ("Rtn. Dev. Id. Opt.", "retain_device_identity"),
    ("Rtn. Inst. Id. Opt.", "retain_institution_identity"),
    ("Rtn. Pat. Chars. Opt.", "retain_patient_characteristics"),
    ("Rtn. Long. Full Dates Opt.", "retain_longitudinal_full_dates"),
    ("Rtn. Long. Modif. Dates Opt.", "retain_longitudinal_modified_dates"),
    ("Clean Desc. Opt.", "clean_descriptors"),
    ("Clean Struct. Cont. Opt.", "clean_structured_content"),
    ("Clean Graph. Opt.", "clean_graphics"),
)
OPTION_KEYS = tuple(key for _, key in PROFILE_COLUMNS[5:])
SAFE_PRIVATE_COLUMNS = (("Data Element", "element"), ("Private Creator", "creator"), ("VR", "vr"),
                        ("VM", "vm"), ("Meaning", "meaning"))
ACTION_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})
# A tag cell is one tag, a repeating-group mask of the form the table uses, or the private-tag row.
_TAG = re.compile(r"\(([0-9A-Fx]{4}),([0-9A-Fx]{4})\)")
PRIVATE_ROW = "(gggg,eeee) where gggg is odd"
MIN_PROFILE_ROWS = 600


class TableError(ValueError):
    """The DocBook does not hold the tables in the shape this generator reads."""


def _text(element: ET.Element) -> str:
    # U+200B marks line-break opportunities in the DocBook; it is not content.
    return " ".join("".join(element.itertext()).replace("\u200b", "").split())


def _table(root: ET.Element, table_id: str) -> ET.Element:
    for table in root.iter(f"{DOCBOOK}table"):
        if table.get(XML_ID) == table_id:
            return table
    raise TableError(f"no table {table_id} in the document")


def _rows(table: ET.Element, columns: tuple[tuple[str, str], ...]) -> list[list[str]]:
    header = table.find(f"{DOCBOOK}thead/{DOCBOOK}tr")
    if header is None:
        raise TableError("table without a header row")
    labels = [_text(cell) for cell in header]
    expected = [label for label, _ in columns]
    if len(labels) != len(expected) or not all(got.startswith(want) for got, want in zip(labels, expected)):
        raise TableError(f"unexpected columns {labels}; expected {expected}")
    rows = []
    for tr in table.iterfind(f"{DOCBOOK}tbody/{DOCBOOK}tr"):
        cells = list(tr)
        if any(cell.get("colspan", "1") != "1" or cell.get("rowspan", "1") != "1" for cell in cells):
            raise TableError(f"spanning cells in row {[_text(c) for c in cells]}")
        if len(cells) != len(columns):
            raise TableError(f"row with {len(cells)} cells: {[_text(c) for c in cells]}")
        rows.append([_text(cell) for cell in cells])
    return rows


def _tag_key(cell: str) -> str:
    """``(0010,0010)`` -> ``00100010``; masks keep their ``x``; the private-tag row is ``private``."""
    if cell == PRIVATE_ROW:
        return "private"
    match = _TAG.fullmatch(cell)
    if match is None:
        raise TableError(f"unreadable tag {cell!r}")
    return (match.group(1) + match.group(2)).upper().replace("X", "x")


def _yes_no(cell: str, where: str) -> bool:
    if cell not in ("Y", "N"):
        raise TableError(f"{where}: expected Y or N, got {cell!r}")
    return cell == "Y"


def _source(document: bytes, root: ET.Element, table_id: str, caption: str) -> dict[str, str]:
    edition = next((_text(e) for e in root.iter(f"{DOCBOOK}subtitle")), "")
    if not edition.startswith("DICOM PS3.15 "):
        raise TableError(f"not PS3.15: {edition!r}")
    return {
        "document": edition,
        "table": f"{table_id.removeprefix('table_').replace('_', ' ')} {caption}",
        "url": SOURCE_URL,
        "sha256": hashlib.sha256(document).hexdigest(),
        "copyright": "NEMA (DICOM is the registered trademark of NEMA); generated from the standard, not edited",
    }


def profile_table(document: bytes) -> dict[str, Any]:
    root = ET.fromstring(document)
    table = _table(root, "table_E.1-1")
    attributes = []
    for row in _rows(table, PROFILE_COLUMNS):
        entry: dict[str, Any] = {"tag": _tag_key(row[1]), "name": row[0]}
        entry["retired"] = _yes_no(row[2], row[1])
        entry["in_std_iod"] = _yes_no(row[3], row[1])
        codes = dict(zip(OPTION_KEYS, row[5:]))
        for code in [row[4], *codes.values()]:
            if code and code not in ACTION_CODES:
                raise TableError(f"{row[1]}: unknown action code {code!r}")
        if not row[4]:
            raise TableError(f"{row[1]}: no Basic Profile action")
        entry["basic"] = row[4]
        entry["options"] = {key: code for key, code in codes.items() if code}
        attributes.append(entry)
    if len(attributes) < MIN_PROFILE_ROWS:
        raise TableError(f"only {len(attributes)} rows in Table E.1-1")
    tags = [a["tag"] for a in attributes]
    if len(set(tags)) != len(tags):
        raise TableError("a tag appears twice in Table E.1-1")
    attributes.sort(key=lambda a: a["tag"])
    caption = _text(table.find(f"{DOCBOOK}caption"))  # type: ignore[arg-type]
    return {"source": _source(document, root, "table_E.1-1", caption), "options": list(OPTION_KEYS),
            "attributes": attributes}


def safe_private_table(document: bytes) -> dict[str, Any]:
    root = ET.fromstring(document)
    table = _table(root, "table_E.3.10-1")
    attributes = []
    for row in _rows(table, SAFE_PRIVATE_COLUMNS):
        match = re.fullmatch(r"\(([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2})\)", row[0])
        if match is None or int(match.group(1), 16) % 2 == 0 or not row[1]:
            raise TableError(f"unreadable safe private attribute {row[:2]}")
        attributes.append({"group": match.group(1).upper(), "element": match.group(2).upper(), "creator": row[1],
                           "vr": row[2], "vm": row[3], "meaning": row[4]})
    attributes.sort(key=lambda a: (a["creator"], a["group"], a["element"]))
    caption = _text(table.find(f"{DOCBOOK}caption"))  # type: ignore[arg-type]
    return {"source": _source(document, root, "table_E.3.10-1", caption), "attributes": attributes}


def render(table: dict[str, Any]) -> str:
    """JSON with one attribute per line: reviewable diffs when a new edition changes a few rows."""
    head = {k: v for k, v in table.items() if k != "attributes"}
    lines = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    rows = ",\n".join("  " + json.dumps(a, ensure_ascii=False, separators=(", ", ": ")) for a in table["attributes"])
    return f'{lines},\n "attributes": [\n{rows}\n ]\n}}\n'


def generate(part15_xml: Path) -> dict[str, str]:
    """File name -> generated text, for every table kept under ``schemas/deidentification/``."""
    document = part15_xml.read_bytes()
    return {PROFILE_TABLE: render(profile_table(document)), SAFE_PRIVATE_TABLE: render(safe_private_table(document))}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m dicomgrid.trials.standard PART15_XML", file=sys.stderr)
        return 2
    for name, text in generate(Path(argv[0])).items():
        (TABLES_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {TABLES_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
