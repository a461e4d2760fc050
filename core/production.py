"""What a production grid refuses to start with: development material and development settings.

``environment = "production"`` in the config makes every service (and ``dicomgrid up``) check, before
it starts, that nothing the repository ships or ``dicomgrid secrets init`` makes for development is
still in use:

* a TLS certificate issued by the development CA (its key sits beside the grid, so anyone who can
  read the data directory could issue certificates for any AE title);
* a secret the repository ships (``security.trial_key_secret``'s default) or a password the local
  cluster's tools ship (e.g. Cassandra's ``cassandra``);
* ``security.require_tokens = false`` or ``security.allow_any_calling_ae = true``.

The refusal is one line naming the first problem (:func:`refusal`).
"""

from __future__ import annotations

from pathlib import Path

from dicomgrid.core.config import DEV_TRIAL_KEY_SECRET, GridConfig, SecretUnavailable
from dicomgrid.core.pki import is_development_certificate

# Secrets shipped with this repository (its earlier shared peer token) or with the tools a local
# cluster is made with (Cassandra's and Kafka examples' defaults).
DEVELOPMENT_SECRETS = frozenset({
    "dicomgrid-dev-peer-token",
    "cassandra",
    "kafka-secret",
    "admin-secret",
    "changeit",
    "password",
})


def problems(config: GridConfig) -> list[str]:
    """Why ``config`` may not run in production; empty when it may (or when it is not production)."""
    if config.environment != "production":
        return []
    found: list[str] = []
    certificates: list[tuple[str, Path]] = []
    if config.tls.dicom or config.tls.http or any(p.tls for p in config.remote_aes.values()):
        certificates.append(("tls.ca_file", config.tls_ca_file))
        for site in config.sites:
            certificates.append((f"sites.{site.name}.tls_cert_file", config.site_tls_files(site.name)[0]))
    for setting, path in certificates:
        if is_development_certificate(path):
            found.append(f"{setting} ({path}) is a development certificate made by `dicomgrid secrets init`")
    secrets = {"kafka.sasl_password": config.kafka.password, "kafka.ssl_key_password": config.kafka.key_password,
               "cassandra.password": config.cassandra.secret_password}
    for setting, read in secrets.items():
        try:
            value = read()
        except SecretUnavailable as exc:
            found.append(str(exc))
            continue
        if value is not None and value.strip().lower() in DEVELOPMENT_SECRETS:
            found.append(f"{setting} is a well-known development password")
    try:
        trial_secret = config.security.trial_key()
    except SecretUnavailable as exc:
        found.append(str(exc))
    else:
        if trial_secret == DEV_TRIAL_KEY_SECRET:
            found.append("security.trial_key_secret is the shipped development secret")
    if not config.security.require_tokens:
        found.append("security.require_tokens is false: DICOMweb would answer anyone")
    if config.security.allow_any_calling_ae:
        found.append("security.allow_any_calling_ae is true: any AE title could associate")
    return found


def refusal(config: GridConfig) -> str | None:
    """The one-line message a production grid refuses to start with, or None."""
    found = problems(config)
    if not found:
        return None
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"refusing to start in production: {found[0]}{more}"
