# Sourced on the GPU machine (repo root): carried wheels, ../shared from its copy, minikv installed
# into the image's python (once per machine), and `waitbuild` for the background llama.cpp build.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
[ -d ../shared ] || cp -r .carry/shared ../shared
# (a bare `import minikv` succeeds from the repo root without the install; minikv.models does not)
python3 -c "import minikv.models" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  > /tmp/install.log 2>&1
startbuild() {  # llama-bench and llama-server from .carry/llsrc into /tmp/llb, outliving the call
  [ -d .carry/llsrc ] && [ ! -e /tmp/llb.started ] || return 0
  touch /tmp/llb.started
  setsid nohup bash -c "cmake -S .carry/llsrc -B /tmp/llb -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -G Ninja \
    > /tmp/llb.configure.log 2>&1 && { cmake --build /tmp/llb --target llama-bench llama-server -j 14 \
    || cmake --build /tmp/llb --target llama-bench llama-server -j 6; } > /tmp/llb.build.log 2>&1; echo \$? > /tmp/llb.rc" > /dev/null 2>&1 < /dev/null &
}
waitbuild() {  # up to $1 seconds; the build's errors go to $OUT
  local i
  for i in $(seq 1 "${1:-400}"); do [ -e /tmp/llb.rc ] && break; sleep 1; done
  echo "llama build rc=$(cat /tmp/llb.rc 2>/dev/null) after ${i}s"
  [ "$(cat /tmp/llb.rc 2>/dev/null)" = 0 ] || { grep -B2 -A12 -m3 -E "error|FAILED" /tmp/llb.build.log /tmp/llb.configure.log; \
    tail -40 /tmp/llb.build.log; free -g; df -h /tmp; } > "$OUT/llb_errors.log" 2>&1
}
