#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-quantize, llama-perplexity and llama-server from the source vendored in the
# llama-cpp-python sdist (PyPI is the only network this machine has). A helper for users of
# benchmarks/bench_vs_llamacpp.py; never run by the tests.
#
#   benchmarks/build_llamacpp.sh OUT_DIR            # 5-12 minutes on 2 cores
#   python benchmarks/bench_vs_llamacpp.py --llama-bin OUT_DIR/build/bin
#
# Needs cmake, ninja and a C++ compiler (Debian: apt-get install -y cmake ninja-build g++).
# Environment: PYTHON (default python3, must have pip), LLAMA_CPP_PYTHON_VERSION (default 0.3.36,
# the version measured in benchmarks/results/vs_llamacpp.md; set it empty for the newest), JOBS (default nproc),
# TARGETS (default: the four tools above).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
python=${PYTHON:-python3}
version=${LLAMA_CPP_PYTHON_VERSION-0.3.36}
spec=llama-cpp-python${version:+==$version}

# 1. the sdist (source only, no wheel), then unpack it
"$python" -m pip download --no-deps --no-binary :all: "$spec" -d "$out/src"
sdist=$(ls -t "$out"/src/llama_cpp_python-*.tar.gz | head -n 1)
tar -xzf "$sdist" -C "$out/src"
srcdir="${sdist%.tar.gz}/vendor/llama.cpp"

# 2. configure and build only the tools (static, tuned for this CPU); llama-server is for
#    benchmarks that compare serving (set TARGETS to build fewer or more)
cmake -S "$srcdir" -B "$out/build" -G Ninja \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
targets=${TARGETS:-llama-bench llama-quantize llama-perplexity llama-server}
# shellcheck disable=SC2086  # the target list is split on purpose
cmake --build "$out/build" -j "${JOBS:-$(nproc)}" --target $targets

for tool in $targets; do
    echo "$out/build/bin/$tool"
done
