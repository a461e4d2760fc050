"""Imaging clinical trials: de-identified query/retrieve of a trial's members with keyed pseudonyms (PS3.15 Annex E)."""
