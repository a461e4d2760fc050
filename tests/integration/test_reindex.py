"""`dicomgrid reindex`: a lost keyspace is rebuilt from the retained event log, the same as the live one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.ledger import ReplicaLedger
from tests.dicom_samples import make_instance
from tests.fault.whole import assert_whole
from tests.grid_fixtures import drop_keyspace
from tests.integration.test_ingest_grid import c_store

pytestmark = [pytest.mark.cluster]


def test_a_keyspace_rebuilt_from_the_event_log_matches_the_live_one(grid, tmp_path):
    study = make_instance().StudyInstanceUID
    stored = [make_instance(study_uid=study) for _ in range(4)]
    assert c_store(grid.site("A"), stored) == [0] * 4
    assert_whole(grid, stored)
    rebuilt = f"{grid.config.cassandra.keyspace}_rebuilt"
    config_file = tmp_path / "rebuilt.toml"
    config_file.write_text(grid.config_file.read_text().replace(
        f'keyspace = "{grid.config.cassandra.keyspace}"', f'keyspace = "{rebuilt}"'))
    other = grid.config.model_copy(update={"cassandra": grid.config.cassandra.model_copy(update={"keyspace": rebuilt})})
    live_db, new_db = Cassandra(grid.config, local_dc="dc2"), Cassandra(other, local_dc="dc2")
    try:
        done = subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(config_file), "reindex", "--dc",
                               "dc2", "--json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        live, new = IndexReader(live_db), IndexReader(new_db)

        def rows(reader: IndexReader) -> list[tuple]:
            return sorted((r.sop_instance_uid, r.sha256, r.version, r.received_site)
                          for r in reader.instances_of_study(study))

        assert rows(new) == rows(live) and len(rows(new)) == 4
        assert new.study(study).number_of_instances == live.study(study).number_of_instances == 4
        for ds in stored:
            digest = live.instance_location(ds.SOPInstanceUID).sha256
            assert ReplicaLedger(new_db).verified_sites(digest) == ReplicaLedger(live_db).verified_sites(digest)
    finally:
        live_db.close()
        new_db.close()
        drop_keyspace(grid.config, rebuilt)
