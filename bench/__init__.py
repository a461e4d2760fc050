"""Benchmark harness of dicomgrid: ``python -m bench`` (``make bench``), never part of ``make test``.

The same DCMTK ``storescu`` sends the same synthetic CT corpora to DCMTK ``storescp`` (a sink close to
the physical limit), to Orthanc and to a one-site grid with every durability guarantee on; results go to
``bench/results/``.
"""
