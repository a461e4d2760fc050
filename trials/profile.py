"""PS3.15 Annex E: the Basic Application Level Confidentiality Profile and the options a trial selects.

The action of every attribute comes from Table E.1-1 as generated from the standard
(``schemas/deidentification/table-e1-1.json``, see :mod:`dicomgrid.trials.standard`). A selected
option's column overrides the Basic Profile (E.3: "A requirement for an Option, when implemented,
overrides any requirement for the underlying Profile"); the option columns hold only C and K, and when
two selected options both name an attribute, C wins (cleaning never keeps more than keeping would).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from pydicom.tag import BaseTag

from dicomgrid.trials.standard import PROFILE_TABLE, SAFE_PRIVATE_TABLE


@dataclass(frozen=True)
class Option:
    """An Annex E option: its name on the command line, its Table E.1-1 column and its PS3.16 code."""

    name: str
    column: str
    code: str
    meaning: str


BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
OPTIONS = {
    option.name: option
    for option in (
        Option("retain-longitudinal-modified-dates", "retain_longitudinal_modified_dates", "113107",
               "Retain Longitudinal Temporal Information Modified Dates Option"),
        Option("retain-longitudinal-full-dates", "retain_longitudinal_full_dates", "113106",
               "Retain Longitudinal Temporal Information Full Dates Option"),
        Option("retain-patient-characteristics", "retain_patient_characteristics", "113108",
               "Retain Patient Characteristics Option"),
        Option("retain-device-identity", "retain_device_identity", "113109", "Retain Device Identity Option"),
        Option("retain-institution-identity", "retain_institution_identity", "113112",
               "Retain Institution Identity Option"),
        Option("clean-descriptors", "clean_descriptors", "113105", "Clean Descriptors Option"),
        Option("retain-safe-private", "retain_safe_private", "113111", "Retain Safe Private Option"),
    )
}
# Options of the standard a trial cannot select, and why.
NOT_OFFERED = {
    "retain-uids": "a trial's UIDs are always keyed pseudonyms: original UIDs never leave the grid",
    "clean-structured-content": "structured report content is not cleaned; it is removed as the Basic Profile says",
    "clean-graphics": "graphics and overlays are not cleaned; they are removed as the Basic Profile says",
    "clean-pixel-data": "pixel data is never altered; instances that may show identity in their pixels are withheld",
    "clean-recognizable-visual-features": "pixel data is never altered",
}
DATE_OPTIONS = ("retain-longitudinal-modified-dates", "retain-longitudinal-full-dates")


class ProfileError(ValueError):
    """Options that cannot be combined, or that are not offered."""


def check_options(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The option names in a canonical order; raises :class:`ProfileError` for unknown or conflicting ones."""
    chosen = set(names)
    for name in chosen:
        if name in NOT_OFFERED:
            raise ProfileError(f"option {name} is not offered: {NOT_OFFERED[name]}")
        if name not in OPTIONS:
            raise ProfileError(f"unknown option {name!r}; options: {', '.join(OPTIONS)}")
    if all(name in chosen for name in DATE_OPTIONS):
        raise ProfileError("the two Retain Longitudinal Temporal Information options exclude each other (E.3.6)")
    return tuple(name for name in OPTIONS if name in chosen)


@dataclass(frozen=True)
class TableEntry:
    tag: str
    name: str
    basic: str
    options: dict[str, str]


@cache
def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("dicomgrid.schemas").joinpath("deidentification", name).read_text("utf-8"))


def table_source() -> dict[str, str]:
    return dict(_load(PROFILE_TABLE)["source"])


@cache
def _entries() -> tuple[dict[int, TableEntry], dict[str, TableEntry]]:
    exact: dict[int, TableEntry] = {}
    masked: dict[str, TableEntry] = {}
    for row in _load(PROFILE_TABLE)["attributes"]:
        entry = TableEntry(row["tag"], row["name"], row["basic"], row["options"])
        if "x" in row["tag"] or row["tag"] == "private":
            masked[row["tag"]] = entry
        else:
            exact[int(row["tag"], 16)] = entry
    return exact, masked


def _in_repeating_group(group: int, base: int) -> bool:
    # PS3.5 7.6: repeating groups are the even groups base..base+0x1E.
    return base <= group <= base + 0x1E and group % 2 == 0


def table_entry(tag: int) -> TableEntry | None:
    """The Table E.1-1 row governing a standard tag (private tags: see :func:`private_entry`)."""
    exact, masked = _entries()
    if tag in exact:
        return exact[tag]
    group, element = tag >> 16, tag & 0xFFFF
    if _in_repeating_group(group, 0x5000):
        return masked.get("50xxxxxx")
    if _in_repeating_group(group, 0x6000):
        return masked.get(f"60xx{element:04X}")
    return None


def private_entry() -> TableEntry:
    return _entries()[1]["private"]


@cache
def safe_private() -> frozenset[tuple[int, str, int]]:
    """(group, private creator, element offset) of the attributes Table E.3.10-1 lists as safe."""
    return frozenset(
        (int(row["group"], 16), row["creator"].strip(), int(row["element"], 16))
        for row in _load(SAFE_PRIVATE_TABLE)["attributes"]
    )


@dataclass(frozen=True)
class Profile:
    """The Basic Profile with a set of options (names from :data:`OPTIONS`)."""

    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", check_options(self.options))

    def has(self, option: str) -> bool:
        return option in self.options

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(OPTIONS[name].column for name in self.options)

    def action(self, entry: TableEntry) -> str:
        """The action code for a row under this profile (compound codes such as X/Z/D as the table has them)."""
        overrides = [entry.options[column] for column in self.columns if column in entry.options]
        if overrides:
            return "C" if "C" in overrides else overrides[0]
        return entry.basic

    def action_for(self, tag: BaseTag | int) -> str | None:
        entry = private_entry() if BaseTag(tag).is_private else table_entry(int(tag))
        return None if entry is None else self.action(entry)

    def codes(self) -> list[tuple[str, str]]:
        """(code value, code meaning) of the profile and its options, for De-identification Method Code Sequence."""
        return [BASIC_PROFILE, *((OPTIONS[name].code, OPTIONS[name].meaning) for name in self.options)]

    @property
    def temporal(self) -> str:
        """Longitudinal Temporal Information Modified (0028,0303), as E.2 and E.3.6 require."""
        if self.has("retain-longitudinal-modified-dates"):
            return "MODIFIED"
        if self.has("retain-longitudinal-full-dates"):
            return "UNMODIFIED"
        return "REMOVED"
