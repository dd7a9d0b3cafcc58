#!/usr/bin/env bash
# Builds what the GPU machine needs to run the REAL ComfyUI server with this pack (no network there), as two
# git-ignored folders at the repository root, to be named in the device call's `carry`:
#   .comfy/  ComfyUI's source from the local snapshot (git archive of the mirror's HEAD) without its tests, CI
#            files, docs and the tokenizer data files (vocab/merges/tokenizer.json/.model: read only when a text
#            encoder is built; the benchmark uses saved text embeddings, no text encoder)
#   .whl/    the wheels of ComfyUI's requirements the GPU machine lacks and the server cannot boot without
#            (cp312, manylinux x86_64, one version each): av (SaveVideo/CreateVideo, comfy_api), torchsde
#            (comfy.k_diffusion.sampling) and trampoline (torchsde's dependency). KIT_EXTRAS=1 adds the soft
#            ones (pydantic + pydantic-settings: custom-node pyproject parsing; SQLAlchemy + alembic: the
#            database), ~7 MB more.
# Not carried, on purpose: comfyui-frontend-package (~20 MB): the benchmark starts main.py with
# --front-end-root on an empty folder (a ComfyUI option: the web UI is not served, the HTTP/ws API is), and
# comfyui-workflow-templates / -embedded-docs (ComfyUI logs their absence and serves without them).
# Prints the sizes and the total against the 64 MiB a device call may carry (working tree + carry paths).
#
#   bash scripts/comfy_gpu_kit.sh            # env: COMFY_MIRROR (bare git dir), PIP (pip command), KIT_EXTRAS
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MIRROR="${COMFY_MIRROR:-/work/.mirror/Comfy-Org+ComfyUI/repo}"
PIP="${PIP:-python3 -m pip}"
LIMIT=$((64 * 1024 * 1024))

# -- ignored, never committed
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
for p in /.comfy/ /.whl/; do grep -qxF "$p" "$EXCLUDE" 2>/dev/null || echo "$p" >> "$EXCLUDE"; done

# -- .comfy: ComfyUI source. A blob of the snapshot is absent (llama tokenizer.json, HunyuanVideo/HiDream only),
#    so the archive is taken with pathspecs that leave it out, with the other files not needed to serve.
[ -d "$MIRROR" ] || { echo "no ComfyUI snapshot at $MIRROR (set COMFY_MIRROR)" >&2; exit 1; }
rm -rf .comfy && mkdir .comfy
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# a tree without those paths, written into a temporary object folder (the mirror is only read)
git --git-dir="$MIRROR" ls-tree -r --full-tree HEAD \
    | grep -v -P '\t(tests/|tests-unit/|\.github/|\.ci/|script_examples/|notebooks/|comfy/text_encoders/llama_tokenizer/tokenizer\.json$)' \
    | GIT_INDEX_FILE="$tmp/index" git --git-dir="$MIRROR" update-index --index-info
mkdir -p "$tmp/objects"
kit_tree=$(GIT_INDEX_FILE="$tmp/index" GIT_OBJECT_DIRECTORY="$tmp/objects" \
           GIT_ALTERNATE_OBJECT_DIRECTORIES="$MIRROR/objects" git --git-dir="$MIRROR" write-tree)
GIT_OBJECT_DIRECTORY="$tmp/objects" GIT_ALTERNATE_OBJECT_DIRECTORIES="$MIRROR/objects" \
    git --git-dir="$MIRROR" archive --format=tar "$kit_tree" | tar -x -C .comfy
git --git-dir="$MIRROR" rev-parse HEAD > .comfy/KIT_COMMIT
# tokenizer data (only read when a text encoder is built); the python files stay
find .comfy/comfy/text_encoders .comfy/comfy/sd1_tokenizer -type f \
    \( -name 'vocab*' -o -name 'merges*' -o -name 'tokenizer.json' -o -name '*.model' \) ! -name '*.py' -delete
find .comfy -type f \( -name '*.md' -o -name '*.png' -o -name '*.jpg' \) -delete
echo "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' .comfy/comfyui_version.py) at $(cut -c1-12 .comfy/KIT_COMMIT)"

# -- .whl: the missing wheels, exact versions (the ones the team's CPU harness runs ComfyUI with)
WHEELS="av==18.1.0 torchsde==0.2.6 trampoline==0.1.2"
if [ "${KIT_EXTRAS:-0}" = 1 ]; then
    WHEELS="$WHEELS pydantic==2.14.4 pydantic-core annotated-types typing-inspection pydantic-settings==2.16.3"
    WHEELS="$WHEELS python-dotenv SQLAlchemy==2.1.9 greenlet alembic==1.20.1 Mako"
fi
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS 2>&1 | grep -v "^WARNING: Location" || true
for w in $WHEELS; do
    n="$(echo "${w%%==*}" | tr 'A-Z-' 'a-z_')"
    ls .whl | sed 's/-.*//' | tr 'A-Z' 'a-z' | grep -qx "$n" || { echo "missing wheel: $w" >&2; exit 1; }
done
dups="$(ls .whl | sed 's/-.*//' | tr 'A-Z' 'a-z' | sort | uniq -d)"
[ -z "$dups" ] || { echo "two versions of: $dups" >&2; exit 1; }
ls .whl

# -- sizes against the limit (the working tree = tracked files + untracked files git does not ignore)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
        | awk '{s+=$1} END {print s+0}')
comfy=$(find .comfy -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
whl=$(find .whl -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
total=$((tree + comfy + whl))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree $(mib "$tree"), .comfy $(mib "$comfy"), .whl $(mib "$whl"): total $(mib "$total") of 64 MiB"
if [ "$total" -gt "$LIMIT" ]; then
    echo "OVER THE LIMIT: carry less (no .gpu_snap in the same call; KIT_EXTRAS=0)" >&2
    exit 2
fi
echo "room left: $(mib $((LIMIT - total))) (a .gpu_snap carried too would need $(mib "$tree") more)"
