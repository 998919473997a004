#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) once, inside the new environment, from the working
# directory (the repository root): install this repository's convflat without touching the
# pinned dependencies above.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -e .
