"""The replication fan-out runs in a grid that replicates, and only there."""

from pathlib import Path

import pytest

from dicomgrid.core.config import load_config
from dicomgrid.processors import app as processors_app
from dicomgrid.processors.replication_policy import replicates


def _config(tmp_path: Path, replicate_to: dict[str, list[str]], min_copies: int):
    sites = "".join(
        f'[[sites]]\nname = "{name}"\nae_title = "GRID_{name}"\ndicom_port = {104 + n}\nhttp_port = {8080 + n}\n'
        f'storage_root = "s/{name}"\ncassandra_dc = "dc{n + 1}"\nreplicate_to = {targets!r}\n'.replace("'", '"')
        for n, (name, targets) in enumerate(replicate_to.items())
    )
    path = tmp_path / "grid.toml"
    path.write_text(f'name = "g"\ndata_dir = "{tmp_path}"\n[kafka]\ntopic_prefix = "lab."\n'
                    f'[replication]\nmin_copies = {min_copies}\n{sites}')
    return load_config(path)


class _NoPublisher:
    """Stands in for the Kafka publisher: building the app must not need a broker."""

    def __init__(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("replicate_to, min_copies, expected", [
    ({"A": []}, 1, False),
    ({"A": [], "B": []}, 1, False),
    ({"A": [], "B": ["A"]}, 1, True),  # A's worker also takes partitions holding B's events
    ({"A": ["B"], "B": ["A"]}, 2, True),
])
def test_the_fan_out_runs_only_where_a_site_copies_to_another(tmp_path: Path, monkeypatch, replicate_to, min_copies,
                                                             expected):
    config = _config(tmp_path, replicate_to, min_copies)
    monkeypatch.setattr(processors_app, "EventPublisher", _NoPublisher)
    agents = set(processors_app.create_app(config, "A").agents)
    assert replicates(config) is expected
    assert ("replication-fanout" in agents) is expected
    # The indexer and the audit chain run in every grid.
    assert {"indexer", "audit-chain"} <= agents
