#!/usr/bin/env bash
# Post-deploy script of envs/iisan.yaml: installs this workflow's library (the iisan-versa
# project, with the extra below) into the new environment.
#
# Snakemake copies this file to <conda prefix>/<env hash>.post-deploy.sh (default prefix
# .snakemake/conda/ under the working directory), activates the new environment and runs the copy
# with the interpreter its first line names, from Snakemake's working directory (that of
# `--directory` where given). The copy knows nothing of the workflow, so the project is looked up:
#   1. $IISAN_WORKFLOW_DIR, where set: it must be the project's root;
#   2. else the working directory or the nearest folder above it holding the project (the
#      repository root when Snakemake runs there, as the README does; a `--directory` inside
#      the repository).
# The project is the folder whose pyproject.toml names "iisan-versa" and which holds src/iisan.
#
# Editable install: the environment imports src/iisan of the repository, so the library and the
# rules that call it always come from the same checkout, as they do in the workflow's venv.
# Snakemake's environment hash covers the environment file and this script, not the library's
# source or pyproject.toml: library edits take effect at once, but a change of the dependencies
# in pyproject.toml needs the environment rebuilt (remove .snakemake/conda/<hash>*, or change
# the environment file). The environment refers to the repository by its absolute path, so
# compute nodes must see the repository at the same path (they need it for the Snakefile
# anyway), and a --conda-prefix shared by several checkouts imports the library of the checkout
# that built the environment.
#
# pip reads its usual PIP_* variables (a package mirror: PIP_INDEX_URL).
set -euo pipefail

env=envs/iisan.yaml  # the environment this script completes (for messages)
extra=workflow  # the pyproject.toml extra it installs

die() {
    echo "post-deploy of $env: $*" >&2
    exit 1
}

is_project() {
    [ -f "$1/pyproject.toml" ] && [ -d "$1/src/iisan" ] && grep -qx 'name = "iisan-versa"' "$1/pyproject.toml"
}

if [ -n "${IISAN_WORKFLOW_DIR:-}" ]; then
    root=$IISAN_WORKFLOW_DIR
    is_project "$root" || die "IISAN_WORKFLOW_DIR=$root is not the iisan-versa repository (no pyproject.toml of iisan-versa beside src/iisan); set it to the folder holding the workflow's Snakefile and pyproject.toml"
else
    root=$PWD
    until is_project "$root"; do
        [ "$root" = / ] && die "cannot find the iisan-versa repository: neither the working directory $PWD nor a folder above it holds its pyproject.toml and src/iisan. Run snakemake from the repository root, or export IISAN_WORKFLOW_DIR=/path/to/the/repository (the folder holding the Snakefile and pyproject.toml), then run it again."
        root=$(dirname "$root")
    done
fi
root=$(cd "$root" && pwd -P)

echo "Installing $root[$extra] (editable) into $(python -c 'import sys; print(sys.prefix)')"
python -m pip install --no-input -e "$root[$extra]"
