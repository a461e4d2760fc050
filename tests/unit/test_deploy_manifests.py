"""The production deploy files (deploy/compose, deploy/kubernetes), checked without a container engine.

- every Kubernetes manifest document validates against the Kubernetes OpenAPI schemas that
  ``kubernetes-validate`` ships (strict: unknown fields are errors), for :data:`KUBERNETES_VERSION`;
- the compose file validates against the Compose Specification's JSON Schema
  (deploy/compose/compose-spec.json, its source commit in deploy/compose/README.md);
- the grid config of each (compose's grid.toml, the ConfigMap's) loads with the grid's own loader and
  passes its validation, with production settings and the secrets from the environment only;
- every dicomgrid command the manifests run is a real ``dicomgrid`` command with valid options, and the
  addresses, ports, probes, volumes and replication settings agree with the config;
- where kustomize (or kubectl) is installed, what ``kubectl apply -k deploy/kubernetes`` would send
  validates too.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import click
import jsonschema_rs
import kubernetes_validate
import pytest
import yaml

from dicomgrid.cli import main as cli_main
from dicomgrid.core.config import GridConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
COMPOSE_SCHEMA = COMPOSE_DIR / "compose-spec.json"
COMPOSE_TOML = COMPOSE_DIR / "grid.toml"
KUBE_DIR = DEPLOY / "kubernetes"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"

# A Kubernetes version kubernetes-validate ships schemas for (kubernetes_validate.utils.all_versions()).
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "dicomgrid"
CLUSTER_DOMAIN = "cluster.local"
SITE_SERVICES = ("receiver", "http", "processors", "replicator")
SECRET_ENV = {
    "DICOMGRID_SECURITY__TRIAL_KEY_SECRET": "a-trial-key-secret-of-the-test-0123456789",
}


# -- loading ---------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _kube_files() -> list[Path]:
    return sorted(p for p in KUBE_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def _kube_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in _kube_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _kube(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _kube_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/kubernetes")


def _configmap_toml() -> str:
    return _kube("ConfigMap", "dicomgrid-config")["data"]["grid.toml"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No DICOMGRID_* variable of the test session leaks into the loaded configs."""
    for key in list(os.environ):
        if key.startswith("DICOMGRID_"):
            monkeypatch.delenv(key)
    return monkeypatch


def _load(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secrets: bool = True) -> GridConfig:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    if secrets:
        for key, value in SECRET_ENV.items():
            monkeypatch.setenv(key, value)
    return load_config(path)


CONFIGS = {
    "compose": lambda: COMPOSE_TOML.read_text(),
    "kubernetes": _configmap_toml,
}


@pytest.fixture(params=sorted(CONFIGS))
def grid(request: pytest.FixtureRequest, tmp_path: Path, clean_env: pytest.MonkeyPatch) -> GridConfig:
    return _load(CONFIGS[request.param](), tmp_path, clean_env)


# -- schemas ---------------------------------------------------------------------------------------


def test_kubernetes_version_is_shipped_by_kubernetes_validate():
    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()


@pytest.mark.parametrize("path", _kube_files(), ids=lambda p: p.name)
def test_every_kubernetes_manifest_validates(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: "
                        f"{exc.message} at {'/'.join(map(str, exc.path))}")


def test_kubernetes_validation_catches_a_mistake():
    deployment = _kube("Deployment", "site-a-http")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _compose_validator() -> Any:
    return jsonschema_rs.validator_for(json.loads(COMPOSE_SCHEMA.read_text()))


def test_compose_file_validates_against_the_compose_specification():
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in _compose_validator().iter_errors(_compose())]
    assert not errors, "\n".join(errors)


def test_compose_schema_is_the_specification_and_names_its_source():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    readme = (COMPOSE_DIR / "README.md").read_text()
    assert "github.com/compose-spec/compose-spec" in readme and "schema/compose-spec.json" in readme
    assert any(len(word.strip("`")) == 40 and all(c in "0123456789abcdef" for c in word.strip("`"))
               for word in readme.split()), "the README names the schema's source commit"


def test_compose_validation_catches_a_mistake():
    validator = _compose_validator()
    broken = _compose()
    broken["services"]["site-a-http"]["healthcheck"]["intervall"] = "15s"
    assert not validator.is_valid(broken)
    broken = _compose()
    broken["services"]["site-a-http"]["restart"] = ["always"]
    assert not validator.is_valid(broken)


# -- the grid config -----------------------------------------------------------------------------------


def test_configs_load_and_are_production_like(grid: GridConfig):
    assert grid.kafka.replication_factor == 3
    assert grid.kafka.min_insync_replicas == 2
    assert len(grid.kafka.bootstrap_servers.split(",")) == 3
    assert grid.cassandra.replication == {"dc1": 3, "dc2": 3}
    assert grid.min_copies == 2
    assert [s.name for s in grid.sites] == ["A", "B"]
    assert {s.name: s.replicate_to for s in grid.sites} == {"A": ["B"], "B": ["A"]}
    assert {s.cassandra_dc for s in grid.sites} == set(grid.cassandra.replication)
    # The secrets come from the environment (the entrypoint's *_FILE variables), not from a file.
    assert grid.security.trial_key() == SECRET_ENV["DICOMGRID_SECURITY__TRIAL_KEY_SECRET"]
    # The token keys (the grid's public one, each site's own pair) are files of the Secret, too.
    assert grid.token_key_files[1].is_relative_to("/run/secrets")
    for site in grid.sites:
        assert all(path.is_relative_to("/run/secrets") for path in grid.site_token_key_files(site.name))
    # TLS is terminated in front of the sites: no development CA is looked for.
    assert not grid.tls.http and not grid.tls.dicom
    assert grid.audit_signing_key_file.is_relative_to("/run/secrets")
    # No DCMTK defaults, no development grid leftovers, no loopback anywhere.
    assert not {"STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "ECHOSCU"} & set(grid.security.allowed_calling_aes)
    assert not grid.security.allow_any_calling_ae
    hosts = [h.rsplit(":", 1)[0] for h in grid.kafka.bootstrap_servers.split(",")]
    hosts += grid.cassandra.contact_points
    hosts += [h for s in grid.sites for h in (s.dicom_host, s.http_host)]
    hosts += [peer.host for peer in grid.remote_aes.values()]
    assert grid.remote_aes
    for host in hosts:
        assert host not in {"localhost", "0.0.0.0", "::1"} and not host.startswith("127."), host
    assert grid.root == Path("/var/lib/dicomgrid")
    for site in grid.sites:
        assert grid.site_storage(site.name).is_relative_to(f"/var/lib/dicomgrid/sites/{site.name}")


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_configs_refuse_to_start_without_the_secrets(which: str, tmp_path: Path, clean_env: pytest.MonkeyPatch):
    with pytest.raises(ValueError, match="trial_key_secret"):
        _load(CONFIGS[which](), tmp_path, clean_env, secrets=False)


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_config_validation_applies_to_the_deploy_configs(which: str, tmp_path: Path, clean_env: pytest.MonkeyPatch):
    text = CONFIGS[which]().replace("min_insync_replicas = 2", "min_insync_replicas = 4")
    with pytest.raises(ValueError, match="min_insync_replicas"):
        _load(text, tmp_path, clean_env)


def test_compose_and_kubernetes_configs_differ_only_in_host_names(tmp_path: Path, clean_env: pytest.MonkeyPatch):
    def without_hosts(config: GridConfig) -> dict[str, Any]:
        data = config.model_dump(mode="json")
        data["kafka"].pop("bootstrap_servers")
        data["cassandra"].pop("contact_points")
        # Secret files are mounted at /run/secrets/ (compose) and /run/secrets/dicomgrid/ (Kubernetes).
        data["security"].pop("audit_signing_key_file")
        data["security"].pop("token_public_key_file")
        for site in data["sites"]:
            site.pop("dicom_host")
            site.pop("http_host")
            site.pop("token_key_file")
            site.pop("token_public_key_file")
        return data

    (tmp_path / "c").mkdir()
    (tmp_path / "k").mkdir()
    compose = _load(COMPOSE_TOML.read_text(), tmp_path / "c", clean_env)
    kube = _load(_configmap_toml(), tmp_path / "k", clean_env)
    assert without_hosts(compose) == without_hosts(kube)


# -- commands --------------------------------------------------------------------------------------


def _dicomgrid_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv after ``dicomgrid``) of every dicomgrid container of both deployments."""
    for name, service in _compose()["services"].items():
        if str(service.get("image", "")).startswith("dicomgrid:"):
            yield f"compose:{name}", list(service["command"])
    for _, doc in _kube_docs():
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        for container in (spec or {}).get("containers", []):
            if container["image"].split(":")[0] == "dicomgrid":
                assert "command" not in container, "the image's entrypoint runs dicomgrid: set args only"
                yield f"kubernetes:{doc['metadata']['name']}", list(container["args"])


def _resolve(argv: list[str]) -> click.Command:
    """The click command ``dicomgrid argv`` runs, its options parsed (not invoked)."""
    command: click.Command = cli_main
    path = ["dicomgrid"]
    args = list(argv)
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"{' '.join(path)} has no command {args[0]!r}"
        path.append(args.pop(0))
        command = sub
    if args == ["--help"]:
        return command
    command.make_context(" ".join(path), args, resilient_parsing=False)
    return command


def test_every_manifest_command_is_a_real_dicomgrid_command(tmp_path: Path, clean_env: pytest.MonkeyPatch):
    commands = list(_dicomgrid_commands())
    assert len(commands) >= 2 * (2 * len(SITE_SERVICES) + 1)
    serve = cli_main.get_command(click.Context(cli_main), "serve")
    sites = {s.name for s in _load(COMPOSE_TOML.read_text(), tmp_path, clean_env).sites}
    for where, argv in commands:
        command = _resolve(argv)
        if argv[0] == "serve":
            assert command is serve.get_command(click.Context(serve), argv[1]), where
            assert argv[2:] == ["--site", argv[3]] and argv[3] in sites, f"{where}: {argv}"
        else:
            assert argv in (["schema", "apply"], ["--help"]), f"{where}: {argv}"


def test_resolve_refuses_what_dicomgrid_would():
    with pytest.raises(AssertionError):
        _resolve(["serve", "indexer", "--site", "A"])
    with pytest.raises(click.UsageError):
        _resolve(["serve", "http", "--sight", "A"])
    with pytest.raises(click.UsageError):
        _resolve(["serve", "http"])


# -- compose: topology and agreement with the config ----------------------------------------------------


def test_compose_topology(tmp_path: Path, clean_env: pytest.MonkeyPatch):
    services = _compose()["services"]
    grid = _load(COMPOSE_TOML.read_text(), tmp_path, clean_env)

    brokers = {n: s for n, s in services.items() if s.get("image", "").startswith("apache/kafka:")}
    assert sorted(brokers) == ["kafka-1", "kafka-2", "kafka-3"]
    for name, broker in brokers.items():
        env = broker["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == 3
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == grid.kafka.replication_factor
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == grid.kafka.min_insync_replicas
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert {e["KAFKA_NODE_ID"] for e in (b["environment"] for b in brokers.values())} == {"1", "2", "3"}
    assert sorted(grid.kafka.bootstrap_servers.split(",")) == sorted(f"{n}:9092" for n in brokers)

    nodes = {n: s for n, s in services.items() if s.get("image", "").startswith("cassandra:")}
    by_dc: dict[str, list[str]] = {}
    for name, node in nodes.items():
        env = node["environment"]
        assert env["CASSANDRA_ENDPOINT_SNITCH"] == "GossipingPropertyFileSnitch"
        by_dc.setdefault(env["CASSANDRA_DC"], []).append(name)
    assert {dc: len(names) for dc, names in by_dc.items()} == {"dc1": 3, "dc2": 3}
    for dc, rf in grid.cassandra.replication.items():
        assert len(by_dc[dc]) >= rf
    assert sorted(grid.cassandra.contact_points) == sorted(nodes)

    for site in grid.sites:
        prefix = f"site-{site.name.lower()}-"
        for kind in SITE_SERVICES:
            service = services[prefix + kind]
            assert service["command"] == ["serve", kind, "--site", site.name]
            assert service["restart"] == "unless-stopped"
            assert service["depends_on"]["schema"]["condition"] == "service_completed_successfully"
        receiver, http = services[prefix + "receiver"], services[prefix + "http"]
        assert receiver["hostname"] == site.dicom_host and http["hostname"] == site.http_host
        assert any(p.endswith(f":{site.dicom_port}") for p in receiver["ports"])
        assert any(p.endswith(f":{site.http_port}") for p in http["ports"])
        assert f"http://{site.http_host}:{site.http_port}/health" in " ".join(http["healthcheck"]["test"])
        assert f"('{site.dicom_host}', {site.dicom_port})" in " ".join(receiver["healthcheck"]["test"])
        # Every service that touches the blob store has the site's volume where the config puts it.
        for kind in ("receiver", "http", "replicator"):
            mounts = dict(v.split(":", 1)[::-1] for v in services[prefix + kind]["volumes"])
            target = mounts[f"/var/lib/dicomgrid/sites/{site.name}"]
            assert target == f"{prefix}blobs"
            assert grid.site_storage(site.name).is_relative_to(f"/var/lib/dicomgrid/sites/{site.name}")


def test_compose_secrets_are_files_the_operator_creates():
    compose = _compose()
    secrets = compose["secrets"]
    ignore = (COMPOSE_DIR / "secrets" / ".gitignore").read_text().split()
    for name, secret in secrets.items():
        assert set(secret) == {"file"}, name
        path = (COMPOSE_DIR / secret["file"]).resolve()
        assert path.parent == COMPOSE_DIR / "secrets", name
        assert "*" in ignore and f"!{path.name}" not in ignore, f"{name} would be committed"
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("dicomgrid:"):
            env = service["environment"]
            assert not any(k.endswith(("TOKEN", "TRIAL_KEY_SECRET", "PASSWORD")) for k in env), name
            for key, value in env.items():
                if key.endswith("_FILE"):
                    assert value.startswith("/run/secrets/") and value.removeprefix("/run/secrets/") in secrets
            assert set(service["secrets"]) == set(secrets), name


# -- kubernetes: topology and agreement with the config -------------------------------------------------


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p["name"] == ref)


def test_kustomization_lists_every_manifest_and_generates_the_secret():
    kustomization = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _kube_files())
    assert kustomization["namespace"] == NAMESPACE
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == "dicomgrid-secrets"
    ignore = (KUBE_DIR / "secrets" / ".gitignore").read_text().split()
    for entry in generator["files"]:
        key, _, path = entry.partition("=")
        assert path.startswith("secrets/") and "*" in ignore and f"!{Path(path).name}" not in ignore, entry
    assert not [doc for _, doc in _kube_docs() if doc["kind"] == "Secret"], "no Secret with values is committed"


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize() is None, reason="neither kustomize nor kubectl is installed")
def test_kustomize_build_renders_valid_manifests(tmp_path: Path):
    """What `kubectl apply -k` would send: namespace, generated Secret and image names filled in."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBE_DIR, tree)
    for name in ("trial_key_secret", "audit_signing_key", "token_public_key", "site_a_token_key",
                 "site_a_token_public_key", "site_b_token_key", "site_b_token_public_key"):
        (tree / "secrets" / name).write_text(f"test-only-{name}-0123456789\n")
    run = subprocess.run([*_kustomize(), str(tree)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert len(docs) == len(_kube_docs()) + 1  # + the generated Secret
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("dicomgrid-secrets-")
    grid_pods = 0
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod and pod["containers"][0]["image"].startswith("registry.example.org/dicomgrid:"):
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
            grid_pods += 1
    assert grid_pods == 2 * len(SITE_SERVICES) + 1  # every site service and the schema Job


def test_kubernetes_topology(tmp_path: Path, clean_env: pytest.MonkeyPatch):
    grid = _load(_configmap_toml(), tmp_path, clean_env)
    kafka = _kube("StatefulSet", "kafka")
    assert kafka["spec"]["replicas"] == 3 and kafka["spec"]["serviceName"] == "kafka"
    env = {e["name"]: e.get("value") for e in _container(kafka)["env"]}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == grid.kafka.replication_factor
    assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == grid.kafka.min_insync_replicas
    fqdn = f"kafka.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
    assert grid.kafka.bootstrap_servers.split(",") == [f"kafka-{i}.{fqdn}:9092" for i in range(3)]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == ",".join(f"{i}@kafka-{i}.{fqdn}:9093" for i in range(3))
    assert _kube("Service", "kafka")["spec"]["clusterIP"] == "None"
    assert _kube("PodDisruptionBudget", "kafka")["spec"]["maxUnavailable"] == 1

    contact_points = []
    for dc, rf in grid.cassandra.replication.items():
        sts = _kube("StatefulSet", f"cassandra-{dc}")
        assert sts["spec"]["replicas"] == 3 >= rf
        env = {e["name"]: e.get("value") for e in _container(sts)["env"]}
        assert (env["CASSANDRA_DC"], env["CASSANDRA_ENDPOINT_SNITCH"]) == (dc, "GossipingPropertyFileSnitch")
        assert _kube("Service", f"cassandra-{dc}")["spec"]["clusterIP"] == "None"
        assert _kube("PodDisruptionBudget", f"cassandra-{dc}")["spec"]["maxUnavailable"] == 1
        contact_points += [f"cassandra-{dc}-{i}.cassandra-{dc}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}" for i in range(3)]
    assert sorted(grid.cassandra.contact_points) == sorted(contact_points)

    for site in grid.sites:
        s = site.name.lower()
        for kind in SITE_SERVICES:
            deployment = _kube("Deployment", f"site-{s}-{kind}")
            pod = deployment["spec"]["template"]["spec"]
            container = _container(deployment)
            assert container["args"] == ["serve", kind, "--site", site.name]
            assert set(container["resources"]) == {"requests", "limits"}
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"memory"} <= set(container["resources"]["limits"])
            assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/etc/dicomgrid"] == "config" and mounts["/run/secrets/dicomgrid"] == "secrets"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["config"]["configMap"]["name"] == "dicomgrid-config"
            assert volumes["secrets"]["secret"]["secretName"] == "dicomgrid-secrets"
            if kind in ("receiver", "http", "replicator"):
                blob = mounts[f"/var/lib/dicomgrid/sites/{site.name}"]
                assert volumes[blob]["persistentVolumeClaim"]["claimName"] == f"site-{s}-blobs"
            if kind in ("receiver", "http"):
                # The pod's own DNS name is the address grid.toml gives the service.
                host = site.dicom_host if kind == "receiver" else site.http_host
                assert f"{pod['hostname']}.{pod['subdomain']}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}" == host
                assert _kube("Service", pod["subdomain"])["spec"]["clusterIP"] == "None"
        receiver = _container(_kube("Deployment", f"site-{s}-receiver"))
        for probe in ("readinessProbe", "livenessProbe"):
            assert _port(receiver, receiver[probe]["tcpSocket"]["port"]) == site.dicom_port
        http = _container(_kube("Deployment", f"site-{s}-http"))
        # Ready when its dependencies answer; alive while the process answers (a Kafka outage must
        # not restart every HTTP pod).
        for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/health/live")):
            assert http[probe]["httpGet"]["path"] == path
            assert _port(http, http[probe]["httpGet"]["port"]) == site.http_port
        assert _kube("PersistentVolumeClaim", f"site-{s}-blobs")["spec"]["accessModes"] == ["ReadWriteMany"]
        assert _kube("PodDisruptionBudget", f"site-{s}")["spec"]["minAvailable"] == len(SITE_SERVICES) - 1
        assert _kube("Service", f"site-{s}-dicom")["spec"]["ports"][0]["targetPort"] in ("dicom", site.dicom_port)


# -- the image's entrypoint ----------------------------------------------------------------------------


def _entrypoint(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "dicomgrid"
    fake.write_text('#!/bin/sh\necho "args:$*"\nenv | grep ^DICOMGRID_ | sort\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["/bin/sh", str(ENTRYPOINT), "serve", "http", "--site", "A"], env={**base, **env},
                          capture_output=True, text=True, timeout=10)


def test_entrypoint_exports_secrets_from_files(tmp_path: Path):
    token = tmp_path / "trial_key_secret"
    token.write_text("s3cret-token-value-with a space\n")
    run = _entrypoint(tmp_path, {"DICOMGRID_SECURITY__TRIAL_KEY_SECRET_FILE": str(token),
                                 "DICOMGRID_KAFKA__BOOTSTRAP_SERVERS": "k:9092"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "args:serve http --site A"
    assert "DICOMGRID_SECURITY__TRIAL_KEY_SECRET=s3cret-token-value-with a space" in lines
    assert "DICOMGRID_KAFKA__BOOTSTRAP_SERVERS=k:9092" in lines
    assert not [line for line in lines if line.startswith("DICOMGRID_SECURITY__TRIAL_KEY_SECRET_FILE")]


def test_entrypoint_refuses_a_missing_secret_file(tmp_path: Path):
    run = _entrypoint(tmp_path, {"DICOMGRID_SECURITY__TRIAL_KEY_SECRET_FILE": str(tmp_path / "absent")})
    assert run.returncode == 64
    assert "DICOMGRID_SECURITY__TRIAL_KEY_SECRET_FILE" in run.stderr and "args:" not in run.stdout


def test_dockerfile_builds_the_package_on_python_312_slim():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.12-slim" in dockerfile
    assert "pip install /src" in dockerfile
    assert 'ENTRYPOINT ["dicomgrid-entrypoint"]' in dockerfile
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for secret_dir in ("deploy/compose/secrets", "deploy/kubernetes/secrets"):
        assert any(fnmatch(secret_dir, pattern) for pattern in ignored), f"{secret_dir} would be in the image"
