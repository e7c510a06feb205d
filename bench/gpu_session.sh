#!/usr/bin/env bash
# A maintainer's runs on a fresh GPU machine, each phase under its own time limit, so that a
# lease that ends mid-list still leaves what finished. Usage:
#
#   bash bench/gpu_session.sh OUT_DIR [PHASES]     PHASES: a comma list of the phases below
#                                                  (default tests,serve,w2,train,rollouts)
#
# engine    the engine's and kernels' GPU tests only (defaults vs enforce_eager, graphs, kernels):
#           the quick check after an engine change.
# tests     every GPU test (`pytest -m gpu`): the Triton kernels against their torch references,
#           graphed and compiled decode against eager, no host sync in a step, no JIT compile
#           after startup. First, because no figure below means anything if these fail.
# serve     bench/serve.py S, W1, W3 and W4 at 512 req/s with the HF peers, medians of 3, engine
#           defaults: the serving headline (cold/warm start, W1 vs HF and vs --enforce-eager,
#           batch-1 decode vs the roofline, REST vs offline).
# long      bench/serve.py W5 and W6: long-prompt prefill MFU, 16k-token TTFT vs an HF SDPA forward.
# variants  bench/serve.py W1 with compile_decode off, then also fused_kernels off: what each part of
#           the default path is worth.
# w2        bench/serve.py W2 alone, medians of 3: the radix prefix cache on vs off.
# train     bench/train.py, astrai compiled vs HF Qwen3 compiled: tokens/s and MFU.
# rollouts  bench/train.py --grpo-rollouts, six timed batches: the engine vs the generate loop
#           (the loop's rate varies from batch to batch, hence six).
# kernels   bench/paged_attention.py (decode, prefill, cascade, K/V store and split tables),
#           bench/gemv.py at batch 1 and its --chain, bench/sampling.py: the measurements behind
#           the kernels' defaults (astrai_serve/kernels/NOTES.md). After a kernel change.
# profile   bench/serve.py --profile on W2 and W3: where a workload's GPU and host time goes.
# ddp       2 GPUs: bench/train.py --ddp-devices 2, then --launcher (train.py under
#           `lightning run model`, DDP and FSDP): data-parallel scaling efficiency.
#
# Each phase writes OUT_DIR/PHASE.log (its tail is printed) and, for a benchmark, OUT_DIR/PHASE.json,
# the raw figures docs/benchmarks.md quotes.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [PHASES]}
phases=${2:-tests,serve,w2,train,rollouts}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

run() {  # run NAME SECONDS CMD...: log to OUT_DIR/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc after $((SECONDS - start)) s"
    tail -n 40 "$out/$name.log"
}

for phase in ${phases//,/ }; do
    case $phase in
        tests) run tests 540 "$py" -m pytest -o addopts="" -m gpu -p no:cacheprovider -q tests/ ;;
        engine) run engine 400 "$py" -m pytest -o addopts="" -m gpu -p no:cacheprovider -q -rA \
                   tests/test_engine_defaults_gpu.py tests/test_kernels_gpu.py tests/test_engine_graphs_gpu.py \
                   tests/test_engine_gpu.py -s ;;
        serve) run serve 540 "$py" bench/serve.py --workloads S,W1,W3,W4 --rate 512 --repeats 3 \
                   --json "$out/serve.json" ;;
        long) run long 300 "$py" bench/serve.py --workloads W5,W6 --repeats 3 --json "$out/long.json" ;;
        variants) run variants 400 bash -c "$py bench/serve.py --workloads W1 --skip-peer --skip-eager \
                   --engine-arg compile_decode=false --json '$out/variant-nocompile.json' && \
                   $py bench/serve.py --workloads W1 --skip-peer --skip-eager --engine-arg compile_decode=false \
                   --engine-arg fused_kernels=false --json '$out/variant-unfused.json'" ;;
        w2) run w2 240 "$py" bench/serve.py --workloads W2 --skip-peer --repeats 3 \
                   --json "$out/w2.json" ;;
        train) run train 420 "$py" bench/train.py --systems astrai-compile,hf-compile --json "$out/train.json" ;;
        rollouts) run rollouts 420 "$py" bench/train.py --grpo-rollouts --skip-peer --rollout-repeats 6 \
                   --json "$out/rollouts.json" ;;
        kernels) run kernels 420 bash -c "$py bench/paged_attention.py --no-tests --sections \
                   decode,config,prefill,cascade,store,splits --json '$out/kernels.json' && \
                   $py bench/gemv.py --json '$out/gemv.json' && $py bench/gemv.py --chain --json '$out/gemv-chain.json' && \
                   $py bench/sampling.py --json '$out/sampling.json'" ;;
        profile) run profile 300 "$py" bench/serve.py --workloads W2,W3 --skip-peer --skip-eager --repeats 1 \
                   --profile --json '' ;;
        ddp) run ddp 540 bash -c "$py bench/train.py --systems astrai-compile --skip-peer --ddp-devices 2 \
                   --json '$out/ddp.json' && $py bench/train.py --launcher --ddp-devices 2 --steps 25 \
                   --json '$out/launcher-ddp.json' && $py bench/train.py --launcher --ddp-devices 2 \
                   --ddp-strategy fsdp --steps 25 --json '$out/launcher-fsdp.json'" ;;
        *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
done
