#!/usr/bin/env bash
# Assemble a CPU-only libtorch 2.11.0 folder (what tch 0.24 links against) from PyPI wheels,
# without a Python environment: torch==2.11.0 carries libtorch_cpu.so, libc10.so, libgomp and the
# headers; libtorch_cpu.so also needs libcudart.so.13 and libcupti.so.13 at load time, which come
# from the nvidia-cuda-runtime / nvidia-cuda-cupti wheels. torch-sys links `-ltorch`; the real
# libtorch.so pulls in libtorch_cuda.so, so on CPU it is replaced by an empty stub.
#
# Usage: scripts/setup-libtorch.sh [DEST]   (default: .deps/libtorch beside this repository's root)
# Idempotent: a complete folder (marked by .complete) is left alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.deps/libtorch}"
cache="${CONNITO_WHEEL_CACHE:-$HOME/.cache/connito-miner/wheels}"
torch_version="2.11.0"

if [[ -f "$dest/.complete" ]] && grep -qx "$torch_version" "$dest/.complete"; then
  echo "libtorch $torch_version already at $dest"
  exit 0
fi

mkdir -p "$cache"
if ! ls "$cache"/torch-"$torch_version"-*.whl >/dev/null 2>&1 \
   || ! ls "$cache"/nvidia_cuda_runtime-13*.whl >/dev/null 2>&1 \
   || ! ls "$cache"/nvidia_cuda_cupti-13*.whl >/dev/null 2>&1; then
  echo "downloading torch==$torch_version and the CUDA runtime wheels into $cache"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" \
    "torch==$torch_version" "nvidia-cuda-runtime>=13,<14" "nvidia-cuda-cupti>=13,<14"
fi

tmp="$(mktemp -d "${dest%/*}/.libtorch.XXXXXX" 2>/dev/null || { mkdir -p "${dest%/*}"; mktemp -d "${dest%/*}/.libtorch.XXXXXX"; })"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/x" "$tmp/libtorch/lib"

torch_whl="$(ls "$cache"/torch-"$torch_version"-*.whl | head -n1)"
python3 - "$torch_whl" "$tmp/x" <<'EOF'
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
want_lib = {"libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libshm.so"}
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("torch/include/") or n.startswith("torch/share/cmake/") \
           or (n.startswith("torch/lib/") and n.rsplit("/", 1)[-1] in want_lib):
            z.extract(n, out)
EOF
mv "$tmp/x/torch/include" "$tmp/libtorch/include"
[[ -d "$tmp/x/torch/share" ]] && mv "$tmp/x/torch/share" "$tmp/libtorch/share"
mv "$tmp/x/torch/lib/"* "$tmp/libtorch/lib/"

for w in "$cache"/nvidia_cuda_runtime-13*.whl "$cache"/nvidia_cuda_cupti-13*.whl; do
  python3 - "$w" "$tmp/libtorch/lib" <<'EOF'
import sys, zipfile, os, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        base = n.rsplit("/", 1)[-1]
        if base in ("libcudart.so.13", "libcupti.so.13"):
            with z.open(n) as src, open(os.path.join(out, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
EOF
done
for so in libcudart.so.13 libcupti.so.13; do
  [[ -f "$tmp/libtorch/lib/$so" ]] || { echo "missing $so in the nvidia wheels" >&2; exit 1; }
done

# torch-sys links -ltorch: an empty stub stands in for the CUDA-pulling real one.
echo "" | cc -shared -x c - -o "$tmp/libtorch/lib/libtorch.so"
# libtorch_cpu.so needs libgomp.so.1 by soname; give the linker a plain name too.
ln -sf libgomp.so.1 "$tmp/libtorch/lib/libgomp.so"
echo "$torch_version" > "$tmp/libtorch/build-version"
echo "$torch_version" > "$tmp/libtorch/.complete"

rm -rf "$dest"
mv "$tmp/libtorch" "$dest"
echo "libtorch $torch_version (CPU) assembled at $dest ($(du -sh "$dest" | cut -f1))"
