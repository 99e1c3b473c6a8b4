#!/bin/bash
# EMR bootstrap action: install dhs's pinned Python dependencies on every node.
# Usage (bootstrap action arguments): s3://my-bucket/dhs/requirements.lock
set -euo pipefail
LOCK_URI=${1:?give the S3 URI of requirements.lock}
aws s3 cp "$LOCK_URI" /tmp/requirements.lock
# Executors only need the data-side packages; torch, jupyter and friends are left out.
grep -E '^(numpy|scipy|pandas|pyarrow|astropy|astropy-iers-data|pyerfa|fitsio|astropy_healpix|astropy-healpix|fsspec|s3fs|aiobotocore|aiohttp|lenscat)==' /tmp/requirements.lock > /tmp/executor-requirements.txt
sudo python3 -m pip install --quiet -r /tmp/executor-requirements.txt
