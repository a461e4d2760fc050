"""A Kafka cluster per site: the config, the topics each site reads, MirrorMaker 2's configuration."""

from pathlib import Path

import pytest

from dicomgrid import schemas
from dicomgrid.core.config import load_config
from dicomgrid.deploy.local.cluster import LocalCluster
from dicomgrid.deploy.local.mirrormaker import mm2_properties, topic_filter
from dicomgrid.processors.app import consumer_group


def _sites(a_kafka: str | None, b_kafka: str | None) -> str:
    out = ""
    for name, dc, peer, kafka in (("A", "dc1", "B", a_kafka), ("B", "dc2", "A", b_kafka)):
        out += (f'[[sites]]\nname = "{name}"\nae_title = "GRID_{name}"\ndicom_port = 1\nhttp_port = 2\n'
                f'storage_root = "s/{name}"\ncassandra_dc = "{dc}"\nreplicate_to = ["{peer}"]\n')
        if kafka:
            out += f'kafka_bootstrap_servers = "{kafka}"\n'
    return out


def _config(tmp_path: Path, a_kafka: str | None, b_kafka: str | None, extra: str = ""):
    path = tmp_path / "grid.toml"
    path.write_text(f'name = "g"\ndata_dir = "{tmp_path}"\n[kafka]\ntopic_prefix = "lab."\n{extra}'
                    + _sites(a_kafka, b_kafka))
    return load_config(path)


def test_the_shared_cluster_is_the_default():
    config = load_config()
    assert not config.kafka_per_site
    for site in config.sites:
        assert config.site_kafka(site.name) is config.kafka
        assert config.for_site(site.name) is config
        assert config.consumed_topics(site.name, schemas.TOPIC_INSTANCE_STORED) == ["dicom.instance.stored"]
        assert consumer_group(config, site.name) == consumer_group(config) == "dicomgrid-local-processors"
    assert [c.name for c in LocalCluster(config)._kafka_components()] == ["kafka"]


def test_each_site_uses_its_own_cluster(tmp_path: Path):
    config = _config(tmp_path, "127.0.0.1:19092", "127.0.0.1:29092")
    assert config.kafka_per_site
    assert config.for_site("A").kafka.bootstrap_servers == "127.0.0.1:19092"
    assert config.for_site("B").kafka.bootstrap_servers == "127.0.0.1:29092"
    # Everything else is the grid's: prefix, timeouts, security.
    assert config.for_site("B").kafka.topic_prefix == "lab."
    assert config.consumed_topics("A", schemas.TOPIC_INSTANCE_STORED) == \
        ["lab.dicom.instance.stored", "B.lab.dicom.instance.stored"]
    assert config.consumed_topics("B", schemas.TOPIC_REPLICATION_REQUESTED) == \
        ["lab.dicom.replication.requested", "A.lab.dicom.replication.requested"]
    assert consumer_group(config, "A") == "g-processors-A" != consumer_group(config, "B")
    components = LocalCluster(config)._kafka_components()
    assert [c.name for c in components] == ["kafka-A", "kafka-B", "mirrormaker"]
    assert [(c.port, c.controller_port) for c in components[:2]] == [(19092, 19093), (29092, 29093)]


@pytest.mark.parametrize("a, b, message", [
    ("127.0.0.1:19092", None, "either every site has its own cluster"),
    ("127.0.0.1:19092", "127.0.0.1:19092", "need distinct clusters"),
])
def test_per_site_clusters_are_all_or_none_and_distinct(tmp_path: Path, a, b, message):
    with pytest.raises(Exception, match=message):
        _config(tmp_path, a, b)


def test_mirrormaker_mirrors_the_grids_topics_both_ways(tmp_path: Path):
    config = _config(tmp_path, "127.0.0.1:19092", "127.0.0.1:29092")
    text = mm2_properties(config)
    settings = dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line and not line.startswith("#"))
    assert settings["clusters"] == "A, B"
    assert settings["A.bootstrap.servers"] == "127.0.0.1:19092"
    assert settings["A->B.enabled"] == settings["B->A.enabled"] == "true"
    assert settings["A->B.topics"] == topic_filter(config)
    assert settings["replication.factor"] == "1"
    # Exact names, dots literal (a properties file would eat a backslash), only the grid's topics.
    names = topic_filter(config).split(",")
    assert len(names) == len(schemas.topics())
    assert "lab[.]dicom[.]instance[.]stored" in names
    assert settings["replication.policy.class"].endswith("DefaultReplicationPolicy")
