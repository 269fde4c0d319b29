#!/usr/bin/env bash
# On the lent GPU machine, from the repository root: reassemble the bundle's chunks, check them against the
# manifest, install the wheels into a temporary site directory, install fast_srt itself, and import everything the
# GPU run uses. docs/gpu.md gives the commands that bring the chunks to CHUNK_DIR first.
#
#   bash bench/gpu/install.sh [CHUNK_DIR] [SITE_DIR]      # defaults: /tmp/fast_srt_bundle /tmp/fast_srt_site
#
# Then, in the same command or a later one while the machine is warm:  export PYTHONPATH=SITE_DIR
# Exit codes: 2 the bundle is incomplete or corrupt (one line names the chunk), 3 pip failed, 4 an import failed.
set -uo pipefail

CHUNK_DIR=${1:-/tmp/fast_srt_bundle}
SITE=${2:-/tmp/fast_srt_site}
PY=${PYTHON:-python3}
PAYLOAD="$CHUNK_DIR/payload"
cd "$(dirname "$0")/../.."

t0=$(date +%s)
"$PY" bench/gpu/bundle.py unpack "$CHUNK_DIR" --dest "$PAYLOAD" || exit 2
rm -rf "$SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$PAYLOAD"/wheels/*.whl; then
  echo "install: pip could not install the bundle's wheels into $SITE (its message is above); the image's Python" \
       "must be 3.12 on x86-64 (this one: $("$PY" -V 2>&1))" >&2
  exit 3
fi
export PYTHONPATH="$SITE"
# fast_srt itself, editable, with no dependencies and no build isolation (setuptools and wheel are in the image)
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/fast_srt_pip_e.log 2>&1; then
  tail -5 /tmp/fast_srt_pip_e.log >&2
  echo "install: pip install -e . failed (log /tmp/fast_srt_pip_e.log)" >&2
  exit 3
fi
if [ -d "$PAYLOAD/assets" ]; then
  echo "install: assets in $PAYLOAD/assets: $(ls "$PAYLOAD/assets" | tr '\n' ' ')"
fi
echo "install: wheels in $SITE, fast_srt editable; $(( $(date +%s) - t0 )) s; now importing"
"$PY" bench/gpu/bundle.py imports || { echo "install: an import failed (FAIL lines above)" >&2; exit 4; }
echo "install: done in $(( $(date +%s) - t0 )) s; export PYTHONPATH=$SITE"
