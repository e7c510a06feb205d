#!/usr/bin/env bash
# One GPU session's build-check-time run, most important first, each phase under its own time
# limit, so a lease that runs out still returns what finished. Usage:
#
#   bash bench/gpu_session.sh OUT_DIR [PHASES]     PHASES: comma list of the phases below
#
# check     new kernels against their references on the GPU (cascade plans, Gumbel sampling, GEMV, K/V store)
# rollouts  bench/train.py --grpo-rollouts (engine vs the generate loop vs HF generate)
# serve     bench/serve.py W1, W3 and W4 (no HF peer: W1's ratio to it is in docs/bench/serve-h200.json)
# w3gemv    bench/serve.py W3 with --decode-gemv (batch-1 decode through the Triton GEMV)
# gemv      bench/gemv.py (batch-1 matmuls: cuBLAS vs the Triton GEMV)
# tests     the GPU tests of the engine's cascade graphs and the kernels' graph capture
# profile-r where a GRPO rollout step goes, with the engine as GRPO runs it (unfused, full context)
# cascade   bench/paged_attention.py's cascade section: rollout and W2 shapes, cascade vs plain
# store     bench/paged_attention.py's store section: one layer's K/V write, index_copy_ x2 vs store_kv
# splits    bench/paged_attention.py's splits section: batch 1 and 4 decode at other KV split counts
# r-fp8     rollouts with the KV cache in fp8 (the engine against the generate loop, as r-loop)
# w1-fp8    W1 with the KV cache in fp8 (W1 and W3, no W4)
# compiles  W4's arrivals with a cold Triton cache, printing every JIT compile (none may follow startup)
# r-loop    rollouts: the engine against the generate loop (no HF generate)
# serve3    bench/serve.py W1, W3, W4, medians of 3
# gpu-tests every GPU test of the engine and the kernels
# w4ab      W4 with async scheduling, then without
# arrivals  W4's arrivals (64 req/s) against the engine alone, beside all-at-once (bench/engine_arrivals.py)
# sampling  bench/sampling.py: the split Gumbel kernel against one program per row
# profile-w3 where a batch-1 step goes with the GEMV
# w4fast    W1 and W4 at 512 requests/s (the arrival window 0.5 s instead of 4 s)
# w4inf     W1 and W4 with every request sent at once (no arrival window: the serving path's own cost)
# w2        W2 alone, medians of 3 (radix cache on vs off)
# profile-w2 where W2's cache-on steps go (kernels, host phases, host functions)
# w4fast8   w4fast with 8 client processes (4 ran 90%+ busy: is the client the limit?)
# w4inf8    w4inf with 8 client processes
# w3        W3 alone, medians of 3 (batch-1 decode: fused QK-norm, SwiGLU prologue, PDL GEMVs)
# w3-nopdl  W3 with the GEMVs launched plainly (EngineConfig.decode_pdl=false)
# chain     bench/gemv.py --chain: 28 layers of GEMVs in one graph, PDL and the SwiGLU prologue on/off
# r-loop6   rollouts with 6 timed batches per system (is the generate loop still warming up?)
# store     (also) the K/V store's GPU checks, fp8 included
# w4api     W1 and W4 at 512 req/s with one REST facade process, then with two (--api-server-count 2)
# w4inf-api2 W1 and W4 with every request at once, two facade processes
# Logs and JSON land in OUT_DIR: 8 files at most, as many as the device tool brings back.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [PHASES]}
phases=${2:-w2,cascade,profile-w2}
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
        check) run check 120 bash -c "$py -m astrai_serve.kernels.selfcheck --suite gpu --only cascade && \
                   $py -m astrai_serve.kernels.triton_sampling && $py -m astrai_serve.kernels.triton_gemv && \
                   $py -m astrai_serve.kernels.triton_kv_store" ;;
        rollouts) run rollouts 240 "$py" bench/train.py --grpo-rollouts --json "$out/rollouts.json" ;;
        serve) run serve 300 "$py" bench/serve.py --compile-decode --workloads W1,W3,W4 --skip-peer \
                   --repeats 1 --json "$out/serve.json" ;;
        w3gemv) run w3gemv 150 "$py" bench/serve.py --compile-decode --decode-gemv --workloads W3 --skip-peer \
                   --json "$out/w3gemv.json" ;;
        gemv) run gemv 120 "$py" bench/gemv.py --json "$out/gemv.json" ;;
        tests) run tests 180 "$py" -m pytest -o addopts="" -m gpu -p no:cacheprovider -q -x \
                   tests/test_kernels_gpu.py tests/test_engine_graphs_gpu.py -k "cascade or gumbel or gemv or sync or store" ;;
        profile-r) run profile-r 240 "$py" bench/profile_step.py --unfused --max-model-len 40960 \
                   --workloads R,host-R ;;
        cascade) run cascade 150 "$py" bench/paged_attention.py --no-tests --sections cascade ;;
        store) run store 120 bash -c "$py -m astrai_serve.kernels.triton_kv_store && \
                   $py bench/paged_attention.py --no-tests --sections store" ;;
        r-fp8) run r-fp8 260 "$py" bench/train.py --grpo-rollouts --skip-peer --engine-arg kv_cache_dtype=fp8 \
                   --json "$out/r-fp8.json" ;;
        w1-fp8) run w1-fp8 200 "$py" bench/serve.py --compile-decode --workloads W1,W3 --skip-peer --repeats 1 \
                   --engine-arg kv_cache_dtype=fp8 --json "$out/w1-fp8.json" ;;
        splits) run splits 120 "$py" bench/paged_attention.py --no-tests --sections splits ;;
        compiles) run compiles 200 env TRITON_CACHE_DIR="$(mktemp -d)" "$py" bench/engine_arrivals.py --rate 64 \
                   --log-compiles ;;
        r-loop) run r-loop 260 "$py" bench/train.py --grpo-rollouts --skip-peer --json "$out/r-loop.json" ;;
        serve3) run serve3 400 "$py" bench/serve.py --compile-decode --workloads W1,W3,W4 --skip-peer \
                   --repeats 3 --json "$out/serve3.json" ;;
        gpu-tests) run gpu-tests 420 "$py" -m pytest -o addopts="" -m gpu -p no:cacheprovider -q -x \
                   tests/test_engine_graphs_gpu.py tests/test_engine_gpu.py tests/test_kernels_gpu.py ;;
        profile-w3) run profile-w3 150 "$py" bench/profile_step.py --decode-gemv --workloads W3,host-W3 ;;
        w4fast) run w4fast 300 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate 512 --json "$out/w4fast.json" ;;
        w4inf) run w4inf 300 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate inf --json "$out/w4inf.json" ;;
        w4ab) run w4ab 300 bash -c "$py bench/serve.py --compile-decode --workloads W4 --skip-peer --json '' && \
                   $py bench/serve.py --compile-decode --workloads W4 --skip-peer --json '' \
                   --engine-arg async_scheduling=false" ;;
        arrivals) run arrivals 200 "$py" bench/engine_arrivals.py --rate 64 ;;
        sampling) run sampling 120 "$py" bench/sampling.py --programs 1024,2048,4096 --json "$out/sampling.json" ;;
        w4fast8) run w4fast8 300 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate 512 --client-procs 8 --json "$out/w4fast8.json" ;;
        w4inf8) run w4inf8 300 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate inf --client-procs 8 --json "$out/w4inf8.json" ;;
        w2) run w2 200 "$py" bench/serve.py --compile-decode --workloads W2 --skip-peer --repeats 3 \
                   --json "$out/w2.json" ;;
        profile-w2) run profile-w2 150 "$py" bench/profile_step.py --compile-decode --max-model-len 4096 \
                   --workloads W2,host-W2 ;;
        w3) run w3 240 "$py" bench/serve.py --compile-decode --workloads W3 --skip-peer --repeats 3 \
                   --json "$out/w3.json" ;;
        w3-nopdl) run w3-nopdl 240 "$py" bench/serve.py --compile-decode --workloads W3 --skip-peer --repeats 3 \
                   --engine-arg decode_pdl=false --json "$out/w3-nopdl.json" ;;
        chain) run chain 120 "$py" bench/gemv.py --chain --json "$out/chain.json" ;;
        r-loop6) run r-loop6 400 "$py" bench/train.py --grpo-rollouts --skip-peer --rollout-repeats 6 \
                   --json "$out/r-loop6.json" ;;
        w4api) run w4api-1 280 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate 512 --json "$out/w4api-1.json"
               run w4api-2 280 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate 512 --api-server-count 2 --json "$out/w4api-2.json" ;;
        w4inf-api2) run w4inf-api2 280 "$py" bench/serve.py --compile-decode --workloads W1,W4 --skip-peer \
                   --repeats 3 --rate inf --api-server-count 2 --json "$out/w4inf-api2.json" ;;
        *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
done
