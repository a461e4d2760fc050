"""Query/retrieve and sinks: what a site serves to PACS, viewers and analytics.

:func:`dimse_services` and :func:`http_routes` are the two places a site's services are assembled from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from dicomgrid.core.site import SiteContext
    from dicomgrid.core.dimse import CalledAETitles, DimseService


def dimse_services(site: "SiteContext") -> list["DimseService"]:
    """Query/retrieve and Storage Commitment services mounted on the site's AE next to storage."""
    from dicomgrid.consumers.find_scp import find_services
    from dicomgrid.consumers.retrieve_scp import retrieve_services
    from dicomgrid.consumers.storage_commitment import storage_commitment_services

    return [*find_services(site), *retrieve_services(site), *storage_commitment_services(site)]


def called_ae_titles(site: "SiteContext") -> "CalledAETitles":
    """The other AE titles the site's DICOM port answers to: every trial's (dicomgrid.trials)."""
    from dicomgrid.trials.dimse import TrialAETitles

    return TrialAETitles(site)


def http_routes(site: "SiteContext") -> list["BaseRoute"]:
    """DICOMweb query/retrieve routes mounted under the site's HTTP service (a trial's under /trials/{name})."""
    from dicomgrid.consumers.qido import qido_routes
    from dicomgrid.consumers.wado import wado_routes
    from dicomgrid.trials.web import trial_routes

    return [*qido_routes(site), *wado_routes(site), *trial_routes(site)]
