#!/usr/bin/env bash
# Runs the ComfyUI tests (`-m comfyui`: in-process, server and browser) against every ComfyUI of the
# test matrix, from this checkout, and prints one summary line per entry.
#
#   tools/comfyui_matrix.sh [--root DIR] [--only ENTRY] [PYTEST ARGS...]
#
#   --root DIR    where the installs are (default: $COMFYUI_MATRIX_ROOT or
#                 /work/comfyui): DIR/<version>/{ComfyUI,venv}, DIR/0.8.0/frontend-newest
#   --only ENTRY  run one entry: 0.3.64 | 0.8.0 | 0.8.0+newest-frontend
#   PYTEST ARGS   passed on, e.g. -k browser; the default marker is 'comfyui and not slow' (-m 'comfyui and slow'
#                 runs the slow SD 1.5 checkpoint test)
#
# Entries (set each up first):
#   0.3.64                  DIR/0.3.64: ComfyUI 0.3.64 and its venv          its pinned frontend 1.27.10
#   0.8.0                   DIR/0.8.0: ComfyUI 0.8.0 and its venv            its pinned frontend 1.35.9
#   0.8.0+newest-frontend   DIR/0.8.0 plus DIR/0.8.0/frontend-newest (pip install --target)
#                           the same ComfyUI serving the newest comfyui-frontend-package from PyPI
#                           (COMFYUI_FRONTEND_ROOT); only the browser tests run here: every other
#                           test talks to the same server code and never loads the frontend, so it
#                           would repeat the 0.8.0 entry exactly.
# JUnit XML per entry goes to test-artifacts/comfyui-matrix-<entry>.xml. Every process runs with
# OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 unless you set them.
set -uo pipefail

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${COMFYUI_MATRIX_ROOT:-/work/comfyui}" ONLY=""
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
        --only) ONLY="${2:?--only needs an entry}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) PYTEST_ARGS+=("$1"); shift ;;
    esac
done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
FRONTEND_TESTS=(tests/test_browser.py)
ALL_TESTS=(tests)  # every test marked comfyui (test_real_layouts.py's ComfyUI check runs in COMFYUI_PYTHON)

summaries=()
run_entry() {  # name, version, frontend root ("" = pinned), test files...
    local name="$1" version="$2" frontend="$3"; shift 3
    [ -z "$ONLY" ] || [ "$ONLY" = "$name" ] || return 0
    local install="$ROOT/$version"
    if [ ! -x "$install/venv/bin/python" ] || [ ! -d "$install/ComfyUI/comfy" ]; then
        summaries+=("$name: NOT RUN, no install at $install (ComfyUI $version and its venv expected there)"); return 0
    fi
    if [ -n "$frontend" ] && [ ! -f "$frontend/index.html" ]; then
        summaries+=("$name: NOT RUN, no frontend at $frontend (pip install --target $install/frontend-newest comfyui-frontend-package)")
        return 0
    fi
    mkdir -p "$PROJECT/test-artifacts"
    local log="$PROJECT/test-artifacts/comfyui-matrix-$name.log"
    echo "=== $name: $install${frontend:+, frontend $frontend}"
    (cd "$PROJECT" && COMFYUI_PATH="$install/ComfyUI" COMFYUI_PYTHON="$install/venv/bin/python" \
        COMFYUI_FRONTEND_ROOT="$frontend" \
        "$install/venv/bin/python" -m pytest -m 'comfyui and not slow' -p no:cacheprovider \
        --junitxml "test-artifacts/comfyui-matrix-$name.xml" "$@" "${PYTEST_ARGS[@]}") 2>&1 | tee "$log"
    summaries+=("$name: $(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' "$log" | tail -n1 | tr -d '=')")
}

run_entry 0.3.64 0.3.64 "" "${ALL_TESTS[@]}"
run_entry 0.8.0 0.8.0 "" "${ALL_TESTS[@]}"
newest="$(ls -d "$ROOT"/0.8.0/frontend-newest/comfyui_frontend_package/static 2>/dev/null)"
run_entry 0.8.0+newest-frontend 0.8.0 "${newest:-$ROOT/0.8.0/frontend-newest/comfyui_frontend_package/static}" \
    "${FRONTEND_TESTS[@]}"

echo
echo "ComfyUI test matrix:"
printf '  %s\n' "${summaries[@]}"
