#!/bin/sh
# Entrypoint of the dicomgrid image: `dicomgrid "$@"`, with secrets read from files first.
#
# For every environment variable DICOMGRID_<NAME>_FILE=<path> (e.g.
# DICOMGRID_SECURITY__TRIAL_KEY_SECRET_FILE=/run/secrets/trial_key_secret) the file's contents, trailing newlines
# removed, are exported as DICOMGRID_<NAME> and the _FILE variable is removed, so Docker/Compose
# secrets and Kubernetes Secret volumes reach the config loader as its ordinary environment overrides
# without a secret value ever being in the environment of the orchestrator or in a committed file.
set -eu

for name in $(env | sed -n 's/^\(DICOMGRID_[A-Za-z0-9_]*\)_FILE=.*$/\1/p'); do
    file=$(printenv "${name}_FILE")
    if [ ! -r "$file" ]; then
        echo "dicomgrid-entrypoint: ${name}_FILE names $file, which cannot be read" >&2
        exit 64
    fi
    value=$(cat "$file")
    if [ -z "$value" ]; then
        echo "dicomgrid-entrypoint: ${name}_FILE names $file, which is empty" >&2
        exit 64
    fi
    export "$name=$value"
    unset "${name}_FILE"
done

exec dicomgrid "$@"
