#!/usr/bin/env bash
# Installs the system packages dicomgrid needs on Debian/Ubuntu (as root), or says what to install.
#   Java 17+ and Maven: run Kafka and Cassandra from Maven Central jars.
#   python3-venv: the project's virtual environment.
#   DCMTK and Orthanc: real DICOM peers for the interoperability tests and benchmarks.
#   Chromium: the status page is tested in a real (headless) browser.
set -euo pipefail

missing=()
java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ "${v:-0}" -ge 17 ]
}
java_ok || missing+=(openjdk-17-jre-headless)
# `make` builds .venv with the python3 on PATH; Debian ships its venv module separately.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
# pynetdicom's venv scripts share DCMTK's tool names (storescu, ...): only DCMTK's banner counts.
dcmtk_ok() {
  local tool
  for tool in $(type -ap storescu) /usr/bin/storescu; do
    [ -x "$tool" ] && [[ "$("$tool" --version 2>/dev/null)" == '$dcmtk:'* ]] && return 0
  done
  return 1
}
dcmtk_ok || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's orthanc package may try to start a system service; the grid starts its own instances.
  exit 0
fi
echo "missing system packages: ${missing[*]}" >&2
echo "install them with: sudo apt-get install ${missing[*]}" >&2
exit 1
