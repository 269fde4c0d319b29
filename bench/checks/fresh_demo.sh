#!/usr/bin/env bash
# `make demo` as a newcomer runs it: a fresh clone of this checkout with an empty model cache, every console line
# stamped with its second since the start, peak RSS by /usr/bin/time -v. Run it on a quiet machine:
#   bash bench/checks/fresh_demo.sh [LOG_DIR]      (default /tmp/fresh_demo; the clone and its cache are removed)
# Then read LOG_DIR/demo_log.txt: the install ends where `fast-srt train` starts.
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
logs=${1:-/tmp/fresh_demo}
work=$(mktemp -d /tmp/fresh_demo_clone.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$logs"
git clone -q "$src" "$work/fast_srt" && cd "$work/fast_srt" || exit 1
export FAST_SRT_CACHE="$work/cache"
git rev-parse --short HEAD > "$logs/commit.txt"
/usr/bin/time -v -o "$logs/time.txt" make demo 2>&1 | python3 -u -c '
import sys, time
t0 = time.time()
for line in sys.stdin:
    print(f"{time.time() - t0:7.1f} {line}", end="", flush=True)' > "$logs/demo_log.txt"
echo "exit ${PIPESTATUS[0]}" >> "$logs/demo_log.txt"
grep -E "Maximum resident|Elapsed" "$logs/time.txt"
grep -nE "converting|converted|warm-up|starting the in-process|memory plan|start-up|eval step +0|^ *[0-9.]+ step +1 |done:" "$logs/demo_log.txt"
