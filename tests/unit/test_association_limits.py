"""Associations per calling AE title: the excess one is rejected (transient, local limit exceeded) and
audited, the same AE gets in again once one is released, and other AEs keep working meanwhile.

A site AE on a free port, its audit records to an in-memory broker: no cluster needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.config import load_config
from dicomgrid.core.dimse import SiteAE
from tests.grid import free_port
from tests.unit.test_ingest import FakePublisher


@pytest.fixture
def site_ae(tmp_path: Path, pynetdicom_settings):
    base = load_config()
    # The plain DICOM port only: no DICOM TLS listener (and so no certificates) in this unit test.
    site = base.site("A").model_copy(update={"dicom_port": free_port(), "dicom_tls_port": None})
    limits = base.limits.model_copy(update={"max_associations_per_calling_ae": 2})
    config = base.model_copy(update={"sites": [site, base.site("B")], "limits": limits})
    publisher = FakePublisher()
    server = SiteAE(config, "A", [], AuditTrail("A", publisher)).serve(spool_dir=tmp_path / "incoming", block=False)
    yield site, publisher
    server.shutdown()
    server.server_close()


def associate(site, calling_ae: str):
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    return ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)


def test_the_excess_association_of_one_calling_ae_is_rejected_and_others_keep_working(site_ae):
    site, publisher = site_ae
    first, second = associate(site, "STORESCU"), associate(site, "STORESCU")
    assert first.is_established and second.is_established
    third = associate(site, "STORESCU")
    assert third.is_rejected
    primitive = third.acceptor.primitive
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x02, 0x03, 0x02)
    # Another PACS is not held back by the first one's associations.
    other = associate(site, "ECHOSCU")
    assert other.is_established and other.send_c_echo().Status == 0x0000
    other.release()
    # Released: the same AE is admitted again.
    first.release()
    again = associate(site, "STORESCU")
    assert again.is_established and again.send_c_echo().Status == 0x0000
    again.release()
    second.release()

    alerts = [a for a in publisher.of(schemas.TOPIC_AUDIT) if a["event"] == "Security Alert"]
    (alert,) = alerts
    assert "2 associations per calling AE" in alert["outcome_description"]
    assert "STORESCU" in alert["outcome_description"]
    schemas.validate_event(schemas.TOPIC_AUDIT, alert)
