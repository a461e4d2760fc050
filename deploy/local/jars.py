"""Runtime classpaths resolved from Maven Central, cached under the grid's data dir.

Each component has a pom under ``maven/<kind>/pom.xml`` whose only job is to list the artifacts;
``mvn dependency:copy-dependencies`` copies them (and their transitive dependencies) into
``<data dir>/lib/<kind>-<version>/``. A marker file records which pom and version filled the folder,
so later runs do no Maven work, and editing the pom or the version resolves again.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from dicomgrid.core.daemon import tail

from .errors import InfraError

_PACKAGE = "dicomgrid.deploy.local"
_MARKER = ".resolved"
_MAVEN_TIMEOUT_S = 1800


def resolve(root: Path, kind: str, version: str) -> Path:
    """The folder holding every jar ``kind`` needs at ``version``, downloading them on first use."""
    pom = resources.files(_PACKAGE).joinpath("maven", kind, "pom.xml")
    stamp = f"{kind} {version} pom-sha256:{hashlib.sha256(pom.read_bytes()).hexdigest()[:16]}"
    target = root / "lib" / f"{kind}-{version}"
    marker = target / _MARKER
    if marker.is_file() and marker.read_text().strip() == stamp:
        return target

    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(
            f"mvn not found: install Maven (apt-get install maven); it is needed once to download "
            f"the {kind} {version} jars from Maven Central into {target}"
        )
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log = staging.with_name(target.name + ".maven.log")
    with resources.as_file(pom) as pom_path, log.open("w") as out:
        try:
            done = subprocess.run(
                [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(pom_path),
                 "dependency:copy-dependencies", f"-D{kind}.version={version}",
                 f"-DoutputDirectory={staging}"],
                stdout=out, stderr=subprocess.STDOUT, cwd=staging, timeout=_MAVEN_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise InfraError(
                f"Maven did not finish resolving {kind} {version} within {_MAVEN_TIMEOUT_S} s "
                f"(is Maven Central reachable?); see {log}"
            ) from None
    if done.returncode != 0 or not any(staging.glob("*.jar")):
        raise InfraError(
            f"Maven could not resolve {kind} {version} (is Maven Central reachable, is the version "
            f"published?); last lines of {log}:\n{tail(log, 30)}"
        )
    (staging / _MARKER).write_text(stamp + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.unlink()
    return target


def find_jar(lib: Path, prefix: str) -> Path:
    """The single jar in ``lib`` named ``<prefix>-<version>.jar`` (e.g. the jamm agent)."""
    matches = sorted(lib.glob(f"{prefix}-[0-9]*.jar"))
    if not matches:
        raise InfraError(f"no {prefix}-*.jar in {lib}: delete the folder to resolve it again")
    return matches[-1]
