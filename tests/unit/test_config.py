from pathlib import Path

import pytest

from dicomgrid.core.config import load_config


def test_default_is_two_site_localhost_grid():
    config = load_config()
    a, b = config.sites
    assert (a.name, a.ae_title, a.dicom_port, a.http_port, a.cassandra_dc) == ("A", "GRID_A", 11112, 8081, "dc1")
    assert (b.name, b.ae_title, b.dicom_port, b.http_port, b.cassandra_dc) == ("B", "GRID_B", 11113, 8082, "dc2")
    assert config.cassandra.replication == {"dc1": 1, "dc2": 1}
    for title in ("STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "ECHOSCU"):
        assert config.is_calling_ae_allowed(title)
    assert not config.is_calling_ae_allowed("INTRUDER")
    assert config.root.is_absolute()


def test_file_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "grid.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = "k1:9092"\npartitions = 3\n')
    monkeypatch.setenv("DICOMGRID_KAFKA__BOOTSTRAP_SERVERS", "k2:9092")
    monkeypatch.setenv("DICOMGRID_DATA_DIR", str(tmp_path / "data"))
    config = load_config(cfg)
    assert config.kafka.bootstrap_servers == "k2:9092"  # env beats file
    assert config.kafka.partitions == 3  # file beats defaults
    assert config.root == tmp_path / "data"
    assert config.site_storage("A") == tmp_path / "data" / "sites" / "A" / "blobs"


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[[sites]]\nname="../x"\nae_title="X"\ndicom_port=1\nhttp_port=2\nstorage_root="s"\ncassandra_dc="dc1"\n',
         "invalid site name"),
        ('[[sites]]\nname="X"\nae_title="BAD\\\\AE"\ndicom_port=1\nhttp_port=2\nstorage_root="s"\ncassandra_dc="dc1"\n',
         "invalid AE title"),
        ('[[sites]]\nname="X"\nae_title="X"\ndicom_port=1\nhttp_port=2\nstorage_root="s"\ncassandra_dc="dc9"\n',
         "not in cassandra.replication"),
        ('[kafka]\nbootstrap_serverz = "x"\n', "Extra inputs"),
    ],
)
def test_invalid_configs_are_refused(tmp_path: Path, toml: str, message: str):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ValueError, match=message):
        load_config(cfg)


def test_topic_prefix_maps_logical_to_physical_topics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert load_config().kafka.topic_prefix == ""
    assert load_config().kafka.topic("dicom.instance.stored") == "dicom.instance.stored"
    cfg = tmp_path / "grid.toml"
    cfg.write_text('[kafka]\ntopic_prefix = "lab-1."\n')
    assert load_config(cfg).kafka.topic("dicom.audit") == "lab-1.dicom.audit"
    monkeypatch.setenv("DICOMGRID_KAFKA__TOPIC_PREFIX", "ci_7.")
    assert load_config(cfg).kafka.topic("dicom.audit") == "ci_7.dicom.audit"


@pytest.mark.parametrize("prefix", ["a b.", "lab/", "é.", "x" * 201])
def test_topic_prefix_must_make_legal_topic_names(tmp_path: Path, prefix: str):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[kafka]\ntopic_prefix = "{prefix}"\n')
    with pytest.raises(ValueError, match="topic_prefix"):
        load_config(cfg)


_SITE = '[[sites]]\nname="{0}"\nae_title="GRID_{0}"\ndicom_port=1\nhttp_port=2\nstorage_root="s"\ncassandra_dc="dc1"\n'


def test_min_copies_defaults_to_two_sites_or_the_only_one(tmp_path: Path):
    assert load_config().min_copies == 2
    cfg = tmp_path / "one.toml"
    cfg.write_text(_SITE.format("X"))
    assert load_config(cfg).min_copies == 1


@pytest.mark.parametrize(
    "toml",
    [
        # Two sites that keep their copies to themselves can never hold an instance twice.
        _SITE.format("X") + _SITE.format("Y"),
        # A site cannot count itself twice.
        _SITE.format("X") + 'replicate_to=["X"]\n' + _SITE.format("Y") + 'replicate_to=["X"]\n',
        "[replication]\nmin_copies=3\n" + _SITE.format("X") + 'replicate_to=["Y"]\n' + _SITE.format("Y")
        + 'replicate_to=["X"]\n',
    ],
)
def test_a_policy_that_cannot_reach_min_copies_is_refused(tmp_path: Path, toml: str):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(toml)
    with pytest.raises(Exception, match="fewer than replication.min_copies"):
        load_config(cfg)


def test_a_users_dict_settings_replace_the_shipped_ones(tmp_path: Path):
    cfg = tmp_path / "prod.toml"
    cfg.write_text('[remote_aes]\nPACS = { host = "10.1.2.3", port = 104 }\n'
                   '[cassandra]\nkeyspace = "prod"\nreplication = { east = 3 }\n'
                   + _SITE.format("X").replace('"dc1"', '"east"'))
    config = load_config(cfg)
    assert set(config.remote_aes) == {"PACS"}  # no shipped localhost destinations left beside it
    assert config.cassandra.replication == {"east": 3}
    assert config.cassandra.keyspace == "prod" and config.cassandra.port == 9042  # sections still merge


@pytest.mark.parametrize("toml, message", [
    ("[kafka]\nreplication_factor = 1\nmin_insync_replicas = 2\n", "every acks=all publish"),
    ("[cassandra]\nreplication = { dc1 = 0, dc2 = 1 }\n", "replication factor of at least 1"),
])
def test_settings_that_cannot_work_are_refused_with_one_clear_message(tmp_path: Path, toml: str, message: str):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(Exception, match=message):
        load_config(cfg)
