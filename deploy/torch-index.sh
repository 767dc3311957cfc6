#!/bin/sh
# Prints the pip options that pick the build of torch for this machine; `make setup` and the image
# builds (deploy/Makefile targets) pass them to pip. Messages go to stderr.
#
#   no NVIDIA GPU (no nvidia-smi):   --extra-index-url https://download.pytorch.org/whl/cpu
#       PyTorch's CPU wheel (torch 2.13.0+cpu, a 190 MB download) instead of the CUDA build that a
#       plain torch==2.13.0 resolves to on Linux x86_64 (several GB with its nvidia-* wheels).
#       Added only when the index answers within 3 s: where it can't be reached pip falls through to
#       its own sources (PyPI, and any find-links or index set in pip's configuration).
#   an NVIDIA GPU:                   nothing: PyPI's torch 2.13.0 is the CUDA build.
#
# TORCH_INDEX=URL overrides the choice (e.g. https://download.pytorch.org/whl/cu128 for a given
# CUDA version); TORCH_INDEX=none adds no index. TORCH_CPU_INDEX moves the CPU index (a mirror).
# PYTHON names the interpreter used for the probe.
set -eu
PYTHON=${PYTHON:-python3}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

probe() {
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1/torch/" \
        >/dev/null 2>&1
}

if [ -n "${TORCH_INDEX:-}" ]; then
    if [ "$TORCH_INDEX" = none ]; then
        echo "torch: TORCH_INDEX=none: pip's own sources decide" >&2
    else
        echo "torch: from $TORCH_INDEX (TORCH_INDEX)" >&2
        echo "--extra-index-url $TORCH_INDEX"
    fi
elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "torch: NVIDIA GPU found (nvidia-smi): the CUDA build from PyPI" >&2
elif probe "$CPU_INDEX"; then
    echo "torch: no NVIDIA GPU: the CPU build from $CPU_INDEX" >&2
    echo "--extra-index-url $CPU_INDEX"
else
    echo "torch: no NVIDIA GPU, and $CPU_INDEX is unreachable: pip's own sources decide" \
        "(here: $(${PYTHON} -m pip config get global.find-links 2>/dev/null || echo PyPI))" >&2
fi
