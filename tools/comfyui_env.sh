#!/usr/bin/env bash
# Sets up one ComfyUI of the test matrix OUTSIDE this project: its files from a fetched git snapshot,
# and a venv that runs both ComfyUI and this pack's tests.
#
#   tools/comfyui_env.sh VERSION DIR [--mirror GIT_DIR] [--newest-frontend] [--force]
#
#   VERSION            ComfyUI version, as its comfyui_version.py says it (e.g. 0.3.64, 0.8.0)
#   DIR                where to put it: DIR/ComfyUI (the files) and DIR/venv (the Python)
#   --mirror GIT_DIR   the (bare) git repository to take ComfyUI from. Without it the script looks
#                      for a commit of that version in /work/.mirror/*/repo and $COMFYUI_MIRRORS
#                      (space-separated git dirs): a tag vVERSION, a branch head whose
#                      comfyui_version.py says VERSION, or else the commit in the history that
#                      set comfyui_version.py to VERSION (upstream's release bump).
#   --newest-frontend  also install the newest `comfyui-frontend-package` from PyPI into
#                      DIR/frontend-newest (a --target folder, so the venv keeps the frontend this
#                      ComfyUI pins) and print the --front-end-root to serve it with; the tests take
#                      it from COMFYUI_FRONTEND_ROOT.
#   --force            replace DIR/ComfyUI even when it was written from another commit
#
# No ComfyUI code is in this project: the script only copies it out of a git snapshot you have.
# Snapshots: the `fetch` verb of the search tool brings one as a bare repository, e.g.
#   fetch github:Comfy-Org/ComfyUI      (upstream; the one here has 0.3.64 at its head)
#   fetch github:pollockjj/ComfyUI      (0.8.0, merged with upstream)
# into /work/.mirror/<owner>+<name>/repo; or `git clone --bare https://github.com/Comfy-Org/ComfyUI`
# anywhere and pass --mirror (upstream tags releases as vX.Y.Z).
#
# Files are written one by one (`git ls-tree -r` + `git cat-file`), not with `git archive`, because a
# snapshot may lack a few large blobs (ComfyUI's llama tokenizer.json, > 4 MiB, which SD 1.x/2.x/XL
# never read) and `git archive` stops at the first missing one; each missing blob is skipped with a
# warning.
#
# The venv gets torch==2.14.1 torchvision==0.29.1, ComfyUI's requirements.txt without
# torch/torchvision/torchaudio (ComfyUI runs without torchaudio; only its audio nodes need it),
# `requests`, this pack's requirements.txt (what ComfyUI-Manager installs) and the test tools of
# pyproject's `dev` extra. The pack itself is NOT installed: tests/comfyui_server.py links the
# checkout under test into a custom_nodes folder, and `python -m pytest` run from a checkout
# imports `duge` from that checkout. Run the matrix with tools/comfyui_matrix.sh.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

VERSION="" DIR="" MIRROR="" NEWEST_FRONTEND=0 FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --mirror) MIRROR="${2:?--mirror needs a git directory}"; shift 2 ;;
        --newest-frontend) NEWEST_FRONTEND=1; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "comfyui_env.sh: unknown option $1" >&2; usage ;;
        *) if [ -z "$VERSION" ]; then VERSION="$1"; elif [ -z "$DIR" ]; then DIR="$1"; else usage; fi; shift ;;
    esac
done
[ -n "$VERSION" ] && [ -n "$DIR" ] || usage
PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

version_at() {  # the __version__ in comfyui_version.py at <git dir> <commit>, or nothing
    git --git-dir="$1" show "$2:comfyui_version.py" 2>/dev/null | sed -n 's/^__version__ = "\(.*\)"/\1/p'
}

find_commit() {  # prints "<git dir> <commit>" of VERSION in git dir $1, or fails
    local gitdir="$1" ref
    if git --git-dir="$gitdir" rev-parse -q --verify "refs/tags/v$VERSION^{commit}" >/dev/null; then
        echo "$gitdir $(git --git-dir="$gitdir" rev-parse "refs/tags/v$VERSION^{commit}")"; return 0
    fi
    for ref in HEAD $(git --git-dir="$gitdir" for-each-ref --format='%(refname)' refs/heads refs/remotes); do
        if [ "$(version_at "$gitdir" "$ref")" = "$VERSION" ]; then
            echo "$gitdir $(git --git-dir="$gitdir" rev-parse "$ref^{commit}")"; return 0
        fi
    done
    # an older release in the history: the commit that set comfyui_version.py to VERSION (its release bump)
    ref="$(git --git-dir="$gitdir" log --all --format=%H -S"__version__ = \"$VERSION\"" -- comfyui_version.py 2>/dev/null | tail -n1)"
    if [ -n "$ref" ] && [ "$(version_at "$gitdir" "$ref")" = "$VERSION" ]; then
        echo "$gitdir $ref"; return 0
    fi
    return 1
}

if [ -n "$MIRROR" ]; then
    FOUND="$(find_commit "$MIRROR")" || { echo "comfyui_env.sh: no commit of ComfyUI $VERSION in $MIRROR" \
        "(no tag v$VERSION, no branch whose comfyui_version.py says $VERSION)" >&2; exit 1; }
else
    FOUND=""
    for gitdir in ${COMFYUI_MIRRORS:-} /work/.mirror/*/repo; do
        [ -d "$gitdir" ] || continue
        FOUND="$(find_commit "$gitdir")" && break || FOUND=""
    done
    if [ -z "$FOUND" ]; then
        cat >&2 <<EOF
comfyui_env.sh: no git snapshot of ComfyUI $VERSION found (looked in \$COMFYUI_MIRRORS and /work/.mirror/*/repo).
Fetch one with the search tool's fetch verb, e.g.
    fetch github:Comfy-Org/ComfyUI     (upstream)
    fetch github:pollockjj/ComfyUI     (0.8.0)
which writes /work/.mirror/<owner>+<name>/repo, or clone one yourself:
    git clone --bare https://github.com/Comfy-Org/ComfyUI /some/where/ComfyUI.git
and pass --mirror /some/where/ComfyUI.git. Then run this script again.
EOF
        exit 1
    fi
fi
read -r GITDIR COMMIT <<<"$FOUND"
echo "ComfyUI $VERSION: commit $COMMIT of $GITDIR"

# ---------------------------------------------------------------- ComfyUI's files
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
TREE="$DIR/ComfyUI"
SOURCE_NOTE="$TREE/.comfyui_env_source"  # what this script wrote the folder from
if [ -f "$SOURCE_NOTE" ] && [ "$(head -n1 "$SOURCE_NOTE")" = "$COMMIT" ]; then
    echo "$TREE already holds commit $COMMIT; not rewritten"
else
    if [ -e "$TREE" ] && [ "$FORCE" != 1 ]; then
        echo "comfyui_env.sh: $TREE exists and was not written from $COMMIT; pass --force to replace it" >&2
        exit 1
    fi
    rm -rf "$TREE.partial"
    mkdir -p "$TREE.partial"
    written=0 skipped=0
    while IFS=$'\t' read -r -d '' meta path; do
        read -r mode kind object <<<"$meta"
        target="$TREE.partial/$path"
        if [ "$kind" != blob ]; then  # a submodule: ComfyUI has none; say so if one appears
            echo "warning: $path is a $kind ($object), not written" >&2; continue
        fi
        if ! git --git-dir="$GITDIR" cat-file -e "$object" 2>/dev/null; then
            echo "warning: the snapshot lacks $path (blob $object); skipped" >&2
            skipped=$((skipped + 1)); continue
        fi
        mkdir -p "$(dirname "$target")"
        if [ "$mode" = 120000 ]; then
            ln -s "$(git --git-dir="$GITDIR" cat-file blob "$object")" "$target"
        else
            git --git-dir="$GITDIR" cat-file blob "$object" > "$target"
            if [ "$mode" = 100755 ]; then chmod +x "$target"; fi
        fi
        written=$((written + 1))
    done < <(git --git-dir="$GITDIR" ls-tree -r -z --full-tree "$COMMIT")
    printf '%s\n%s\nComfyUI %s; %d files written, %d missing blobs skipped\n' \
        "$COMMIT" "$GITDIR" "$VERSION" "$written" "$skipped" > "$TREE.partial/.comfyui_env_source"
    rm -rf "$TREE"
    mv "$TREE.partial" "$TREE"
    echo "wrote $written files to $TREE ($skipped missing blobs skipped)"
fi
written_version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$TREE/comfyui_version.py")"
[ "$written_version" = "$VERSION" ] || { echo "comfyui_env.sh: $TREE is ComfyUI $written_version, not $VERSION" >&2; exit 1; }

# ---------------------------------------------------------------- the venv
VENV="$DIR/venv"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
comfy_requirements="$(mktemp)"
pack_test_tools="$(mktemp)"
trap 'rm -f "$comfy_requirements" "$pack_test_tools"' EXIT
grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#]|$)' "$TREE/requirements.txt" \
    > "$comfy_requirements"
"$PYTHON" - "$PROJECT/pyproject.toml" > "$pack_test_tools" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["dev"]))
EOF
# torch pinned again so no requirement can move it
"${PIP[@]}" -r "$comfy_requirements" requests -r "$PROJECT/requirements.txt" -r "$pack_test_tools" \
    torch==2.14.1 torchvision==0.29.1
echo "venv: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

# ComfyUI must start in it (a missing dependency shows here, not in the first test): its own CI
# check loads every built-in node and exits; folders it writes go to a scratch dir, not the tree.
scratch="$(mktemp -d)"
mkdir -p "$scratch"/{output,user,temp,input}
(cd "$TREE" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$VENV/bin/python" main.py --cpu --quick-test-for-ci \
    --disable-all-custom-nodes --output-directory "$scratch/output" --user-directory "$scratch/user" \
    --temp-directory "$scratch/temp" --input-directory "$scratch/input" > "$scratch/log" 2>&1) \
    || { tail -n 30 "$scratch/log" >&2; echo "comfyui_env.sh: ComfyUI $VERSION does not start in $VENV" >&2; exit 1; }
rm -rf "$scratch"

# ---------------------------------------------------------------- the newest frontend (optional)
if [ "$NEWEST_FRONTEND" = 1 ]; then
    FRONTEND="$DIR/frontend-newest"
    rm -rf "$FRONTEND.partial"
    "${PIP[@]}" --no-deps --target "$FRONTEND.partial" --upgrade comfyui-frontend-package
    rm -rf "$FRONTEND"
    mv "$FRONTEND.partial" "$FRONTEND"
    installed="$(ls -d "$FRONTEND"/comfyui_frontend_package-*.dist-info | sed 's/.*package-\(.*\)\.dist-info/\1/')"
    echo "newest frontend $installed: serve it with --front-end-root $FRONTEND/comfyui_frontend_package/static"
    echo "(tests: COMFYUI_FRONTEND_ROOT=$FRONTEND/comfyui_frontend_package/static)"
fi
echo "ready: COMFYUI_PATH=$TREE $VENV/bin/python -m pytest -m comfyui   (from a checkout of this project)"
