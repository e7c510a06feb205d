"""Training benchmark: astrai's SEQ LightningModule under its Lightning Trainer against Hugging Face
`Qwen3ForCausalLM` of the same shape in a plain PyTorch loop, same GPU, same random batches.
Prints one table and writes JSON.

    python bench/train.py [--preset qwen3-0.6b] [--micro-batch 8] [--seq-len 2048] [--steps 10]
                          [--systems astrai,astrai-compile,hf,hf-compile] [--ddp-devices 2]
                          [--json out.json] [--skip-peer] [--tiny]
    python bench/train.py --grpo-rollouts     # rollout tokens/s: serving engine vs generate loops
    python bench/train.py --launcher --ddp-devices 2 [--ddp-strategy fsdp] [--steps 25]
                                              # train.py itself under `lightning run model`, 1 vs N GPUs

Systems (each in its own process on the GPU):
  astrai          SeqModule + the Trainer that `astrai train` builds (runner.build_trainer),
                  bf16-mixed, fused AdamW, grad clip 1.0, its logging and throughput callbacks
  astrai-compile  the same with model.compile=true (the recipe's torch.compile of the blocks)
  hf / hf-compile Qwen3ForCausalLM (SDPA), fp32 weights, bf16 autocast, fused AdamW, grad clip
                  1.0, use_cache=False; eager, and torch.compile(model)
  --ddp-devices N adds the astrai system (compiled when astrai-compile is among --systems) on N
                  GPUs (Lightning DDP, or --ddp-strategy fsdp; same micro-batch per GPU) and its
                  scaling efficiency = tokens/s on N GPUs / (N x tokens/s on one).

Timing: `--warmup-steps` steps first (compilation happens there; their time is in the note),
then `--steps` optimizer steps between two device synchronisations. Peak memory is
torch.cuda.max_memory_allocated over the timed steps. Model FLOPs per token, the same for every
system (astrai_train.objectives.throughput.flops_per_token, PaLM appendix B):
    6 N + 12 L H Dh T     N parameters in matmuls (a tied embedding counted once), L layers,
                          H query heads, Dh head dim, T sequence length (causal masking not discounted)
MFU = tokens/s x FLOPs per token / peak dense bf16 FLOP/s (989e12 for H100/H200 SXM).

--grpo-rollouts is train_rollouts.py's measurement, --launcher train_launcher.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_rollouts  # noqa: E402
from common import Row, key, log  # noqa: E402

FIRST_ID = 5  # below: the tokenizer's special tokens
SYSTEMS = {"astrai": "astrai (Lightning)", "astrai-compile": "astrai (Lightning, compiled)",
           "hf": "hf Qwen3 loop", "hf-compile": "hf Qwen3 loop (compiled)"}
TOKS = "tokens/s"


def ddp_system(spec: dict[str, Any]) -> str:
    compiled = "compiled, " if spec["ddp_compile"] else ""
    return f"astrai (Lightning, {compiled}{spec['ddp_devices']} GPUs {spec['ddp_strategy']})"


def random_batches(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """warmup + steps batches of random ids: input_ids and target_ids (inputs shifted by one)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = spec["warmup_steps"] + spec["steps"]
    data = torch.randint(FIRST_ID, spec["vocab"], (n, spec["micro_batch"], spec["seq_len"] + 1), generator=g)
    return [{"input_ids": d[:, :-1].contiguous(), "target_ids": d[:, 1:].contiguous()} for d in data]


def flops_and_peak(spec: dict[str, Any], n_params: int) -> tuple[float, float | None]:
    import torch

    from astrai_train.model import ModelConfig
    from astrai_train.objectives.throughput import flops_per_token, peak_flops

    config = ModelConfig.from_preset(spec["preset"], **spec["overrides"])
    peak = spec["peak_tflops"] * 1e12 if spec["peak_tflops"] else None
    if peak is None and torch.cuda.is_available():
        peak = peak_flops(torch.cuda.get_device_name())
    return flops_per_token(config, n_params, spec["seq_len"]), peak


def result_rows(spec: dict[str, Any], system: str, tokens_per_s: float, step_s: float, peak_mem: float | None,
                n_params: int, warm_s: float, peers: list[str], devices: int = 1) -> list[Row]:
    """tokens/s (all devices), step time, peak memory (of rank 0) and MFU (per device)."""
    flops, peak = flops_and_peak(spec, n_params)
    shape = f"micro-batch {spec['micro_batch']} x {spec['seq_len']}, {spec['steps']} steps timed"
    mfu_note = (f"6N + 12*L*H*Dh*T = {flops / 1e9:.2f} GFLOP/token (N = {n_params / 1e6:.1f}M); "
                f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "no peak FLOP/s known for this device")
    return [
        Row("train", system, TOKS, tokens_per_s, peers=peers,
            note=f"{shape}; warm-up {spec['warmup_steps']} steps took {warm_s:.1f} s"),
        Row("train", system, "step ms", 1e3 * step_s),
        Row("train", system, "peak memory GiB", peak_mem / 2**30 if peak_mem is not None else None),
        Row("train", system, "MFU %", 100 * tokens_per_s / devices * flops / peak if peak else None, note=mfu_note),
    ]


# ---- astrai: the real LightningModule and Trainer ---------------------------------------------

def phase_astrai(spec: dict[str, Any], out: common.Sink, compile: bool = False, devices: int = 1) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from astrai_train.model import ModelConfig
    from astrai_train.objectives import MODULES
    from astrai_train.objectives.config import load_recipe
    from astrai_train.objectives.launch import resolve_world
    from astrai_train.objectives.runner import build_trainer

    n = spec["warmup_steps"] + spec["steps"]
    overrides = [f"model.preset={spec['preset']}", f"model.compile={str(compile).lower()}", f"trainer.max_steps={n}",
                 f"trainer.precision={spec['precision']}", f"trainer.devices={devices}",
                 "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=0", f"out_dir={spec['workdir']}",
                 f"name=astrai-{'compile' if compile else 'eager'}-{devices}"]
    overrides += [f"model.overrides.{k}={v}" for k, v in spec["overrides"].items()]
    if devices > 1:
        overrides.append(f"trainer.strategy={spec['ddp_strategy']}")
    recipe = load_recipe(None, overrides)
    # As the runner does: fill devices/strategy/precision the way `astrai train` would (no launcher).
    recipe = dataclasses.replace(recipe, trainer=resolve_world(recipe.trainer, {}, torch.cuda.is_available()))
    L.seed_everything(recipe.seed, verbose=False)
    module = MODULES["seq"](recipe, ModelConfig.from_preset(spec["preset"], **spec["overrides"]))
    n_params = module.model.num_parameters()  # before FSDP shards it: afterwards each rank sees its shard
    trainer = build_trainer(recipe, module)
    # Checkpoints are not what is measured, and a 0.6B run writes ~7 GB per checkpoint: none here.
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)
                            and type(c).__module__ != "astrai_train.objectives.checkpointing"]
    timer = step_timer(spec["warmup_steps"], n, spec["micro_batch"] * spec["seq_len"] * trainer.world_size)
    trainer.callbacks.insert(0, timer)  # first: its end-of-step sync must precede other callbacks' work
    loader = DataLoader(random_batches(spec), batch_size=None, shuffle=False, pin_memory=torch.cuda.is_available())
    trainer.fit(module, train_dataloaders=loader)
    if not trainer.is_global_zero:
        return
    system = ddp_system(spec) if devices > 1 else SYSTEMS["astrai-compile" if compile else "astrai"]
    peers = [key("train", SYSTEMS[s], TOKS) for s in ("hf", "hf-compile")] if devices == 1 else []
    out.add(*result_rows(spec, system, timer.tokens / timer.elapsed, timer.elapsed / spec["steps"], timer.peak_mem,
                         n_params, timer.warm_s, peers, trainer.world_size))


def step_timer(warmup: int, total: int, tokens_per_step: int) -> Any:
    """A Lightning callback timing optimizer steps [warmup, total) between two device syncs."""
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.start = self.t0 = self.warm_s = self.elapsed = 0.0
            self.tokens = 0
            self.peak_mem: float | None = None

        def _sync(self, module: Any) -> None:
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                self.t0 = time.perf_counter()
            if batch_idx == warmup:
                self._sync(module)
                self.warm_s = time.perf_counter() - self.t0
                if module.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(module.device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == total - 1:
                self._sync(module)
                self.elapsed = time.perf_counter() - self.start
                self.tokens = tokens_per_step * (total - warmup)
                if module.device.type == "cuda":
                    self.peak_mem = float(torch.cuda.max_memory_allocated(module.device))

    return StepTimer()


# ---- the peer: HF Qwen3ForCausalLM in a plain PyTorch loop ------------------------------------

def hf_model(spec: dict[str, Any]) -> Any:
    """Qwen3ForCausalLM of the preset's shape (through astrai's own export mapping), fp32, SDPA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from astrai_train.model import ModelConfig
    from astrai_train.model.hf import hf_config

    data = hf_config(ModelConfig.from_preset(spec["preset"], **spec["overrides"]), {})
    data.pop("architectures", None)
    data.pop("torch_dtype", None)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if type(model).__name__ != "Qwen3ForCausalLM":
        raise RuntimeError(f"expected Qwen3ForCausalLM, built {type(model).__name__}")
    return model.to(spec["device"]).train()


def phase_hf(spec: dict[str, Any], out: common.Sink, compile: bool = False) -> None:
    import torch

    device = spec["device"]
    model = hf_model(spec)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True if device == "cuda" else None)
    forward = torch.compile(model) if compile else model
    batches = random_batches(spec)

    def step(batch: dict[str, Any]) -> None:
        ids = batch["input_ids"].to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    w = spec["warmup_steps"]
    warm_s, _ = common.timed(lambda: [step(b) for b in batches[:w]], device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs, _ = common.timed(lambda: [step(b) for b in batches[w:]], device)
    peak_mem = float(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    tokens = spec["steps"] * spec["micro_batch"] * spec["seq_len"]
    n_params = sum(p.numel() for p in params)
    out.add(*result_rows(spec, SYSTEMS["hf-compile" if compile else "hf"], tokens / secs, secs / spec["steps"],
                         peak_mem, n_params, warm_s, []))


# ---- command line -----------------------------------------------------------------------------

PHASES = {
    "astrai": lambda spec, out: phase_astrai(spec, out),
    "astrai-compile": lambda spec, out: phase_astrai(spec, out, compile=True),
    "astrai-ddp": lambda spec, out: phase_astrai(spec, out, compile=spec["ddp_compile"], devices=spec["ddp_devices"]),
    "hf": lambda spec, out: phase_hf(spec, out),
    "hf-compile": lambda spec, out: phase_hf(spec, out, compile=True),
    "rollout-engine": lambda spec, out: train_rollouts.phase_rollout(spec, out, "engine"),
    "rollout-generate": lambda spec, out: train_rollouts.phase_rollout(spec, out, "generate"),
    "rollout-hf": lambda spec, out: train_rollouts.phase_rollout(spec, out, "hf"),
}


def expected_rows(phase: str, spec: dict[str, Any]) -> list[Row]:
    if phase.startswith("rollout-"):
        name = train_rollouts.SYSTEMS[phase.removeprefix("rollout-")]
        return [Row("rollout", name, train_rollouts.METRIC, None)]
    system = ddp_system(spec) if phase == "astrai-ddp" else SYSTEMS[phase]
    return [Row("train", system, TOKS, None)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default qwen3-0.6b; tiny with --tiny)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step and GPU (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--systems", default=None, help="comma-separated: astrai,astrai-compile,hf,hf-compile "
                                                   "(default all four; astrai,hf with --tiny)")
    p.add_argument("--skip-peer", action="store_true",
                   help="leave out the Hugging Face systems (with --grpo-rollouts: HF generate; the generate loop stays)")
    p.add_argument("--ddp-devices", type=int, default=0, help="also run the astrai system on this many GPUs (0: no)")
    p.add_argument("--ddp-strategy", default="ddp", choices=["ddp", "fsdp"], help="strategy for --ddp-devices")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision of the astrai systems (default bf16-mixed)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default: by device name, 989 for H100/H200 SXM)")
    p.add_argument("--grpo-rollouts", action="store_true", help="measure GRPO rollout generation instead of training")
    p.add_argument("--launcher", action="store_true",
                   help="instead: train.py on the shipped corpus under `lightning run model`, on 1 and on "
                        "--ddp-devices GPUs (default 2), --steps optimizer steps (default 30)")
    p.add_argument("--rollout-prompts", type=int, default=None, help="rollout prompts (default 32)")
    p.add_argument("--group-size", type=int, default=None, help="samples per prompt (default 8)")
    p.add_argument("--rollout-tokens", type=int, default=None, help="max new tokens per sample (default 256)")
    p.add_argument("--rollout-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="rollout model dtype on the GPU (GRPO under bf16-mixed keeps float32 weights)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1.0)")
    p.add_argument("--rollout-repeats", type=int, default=None,
                   help="timed rollout batches per system, median reported (default 3; 1 with --tiny): "
                        "the generate loop's rate varied by 25%% between single runs")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an EngineConfig setting for the rollout engine, e.g. cascade_attention=false (repeatable)")
    p.add_argument("--json", default=None, help="where to write JSON (default bench-train.json / bench-rollouts.json / "
                                                "bench-launcher.json; '' for none)")
    p.add_argument("--tiny", action="store_true", help="tiny preset and sizes, for a CPU smoke run")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per system (default: on with CUDA, off on the CPU)")
    p.add_argument("--phase-timeout-s", type=float, default=420.0, help="stop a system's process after this long")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("micro_batch", "seq_len", "steps", "warmup_steps", "rollout_prompts", "group_size", "rollout_tokens",
                 "rollout_repeats"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            p.error(f"--{name.replace('_', '-')} {value}: must be >= {0 if name == 'warmup_steps' else 1}")
    args.engine_overrides = common.key_values(p, "--engine-arg", args.engine_arg)
    if args.launcher and args.grpo_rollouts:
        p.error("--launcher and --grpo-rollouts: choose one")
    if args.systems:
        bad = sorted(set(args.systems.split(",")) - {"astrai", "astrai-compile", "hf", "hf-compile"})
        if bad:
            p.error(f"--systems: unknown system {bad[0]!r} (choose from astrai, astrai-compile, hf, hf-compile)")
    return args


def build_spec(args: argparse.Namespace, device: str, workdir: Path) -> dict[str, Any]:
    tiny = args.tiny
    preset = args.preset or ("tiny" if tiny else "qwen3-0.6b")
    overrides = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "dim_ffn": 128, "vocab_size": 512} if tiny else {}

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if tiny else full)

    group = pick(args.group_size, 8, 2)
    prompts = pick(args.rollout_prompts, 32, 2)
    return {"preset": preset, "overrides": overrides, "device": device, "workdir": str(workdir),
            "micro_batch": pick(args.micro_batch, 8, 2), "seq_len": pick(args.seq_len, 2048, 32),
            "steps": pick(args.steps, 10, 2), "warmup_steps": pick(args.warmup_steps, 3, 1),
            "precision": args.precision, "peak_tflops": args.peak_tflops,
            "ddp_devices": args.ddp_devices, "ddp_strategy": args.ddp_strategy, "ddp_compile": False,
            "rollout_prompts": prompts, "group_size": group, "rollout_tokens": pick(args.rollout_tokens, 256, 6),
            "rollout_prompt_range": (64, 256) if not tiny else (4, 12), "rollout_dtype": args.rollout_dtype,
            "temperature": args.temperature, "rollout_repeats": pick(args.rollout_repeats, 3, 1),
            "engine_args": {"max_num_seqs": max(prompts * group, 8),
                            "max_num_batched_tokens": 16384 if not tiny else 256, **args.engine_overrides}}


def main(argv: list[str] | None = None) -> int:
    return common.cli_main("bench/train.py", parse_args, _main, argv)


def _main(args: argparse.Namespace) -> int:
    if args.phase:  # a child process measuring one system
        return common.phase_main(PHASES, args.phase, args.spec, args.phase_out)
    if args.launcher:
        return _launcher_main(args)
    import torch

    device, threads_before, extra_env = common.run_setup(args.tiny)
    isolate = device == "cuda" if args.isolate is None else args.isolate
    if args.ddp_devices > 1 and not isolate:
        raise SystemExit("bench/train.py: error: --ddp-devices needs --isolate (Lightning re-launches the script per rank)")
    env = common.environment()
    workdir = Path(tempfile.mkdtemp(prefix="astrai-bench-train-"))
    try:
        spec = build_spec(args, device, workdir)
        if args.grpo_rollouts:
            log(f"building {spec['preset']} with random weights in {workdir}")
            model_dir = common.random_model_dir(spec["preset"], workdir / "model", dtype="bfloat16", **spec["overrides"])
            from astrai_train.model.hf_export import export_hf

            spec["model_dir"] = str(model_dir)
            # --skip-peer leaves out HF generate; the generate loop (the target's baseline) stays
            spec["hf_dir"] = str(export_hf(model_dir, workdir / "hf", dtype=torch.bfloat16)) if not args.skip_peer else None
            phases = ["rollout-engine", "rollout-generate"] + ([] if args.skip_peer else ["rollout-hf"])
            default_json = "bench-rollouts.json"
        else:
            systems = (args.systems or ("astrai,hf" if args.tiny else "astrai,astrai-compile,hf,hf-compile")).split(",")
            phases = [s for s in systems if not (args.skip_peer and s.startswith("hf"))]
            spec["ddp_compile"] = "astrai-compile" in systems
            phases += ["astrai-ddp"] if args.ddp_devices > 1 else []
            default_json = "bench-train.json"
        spec["vocab"] = json.loads((workdir / "model" / "config.json").read_text())["vocab_size"] \
            if args.grpo_rollouts else _vocab(spec)
        rows: list[Row] = []
        for phase in phases:
            got, error = common.run_phase(PHASES, phase, spec, isolate, __file__, args.phase_timeout_s, workdir, extra_env)
            rows += common.fill_missing(got, expected_rows(phase, spec), error) if error else got
        if args.ddp_devices > 1:
            rows += scaling_rows(rows, spec)
        settings = {k: v for k, v in spec.items() if k not in ("workdir", "model_dir", "hf_dir")}
        json_path = default_json if args.json is None else args.json
        common.report("bench/train.py" + (" --grpo-rollouts" if args.grpo_rollouts else ""), rows, env,
                      {**settings, "isolate": isolate}, json_path or None)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _launcher_main(args: argparse.Namespace) -> int:
    import train_launcher

    devices, steps = args.ddp_devices or 2, args.steps or 30
    rows = train_launcher.measure(devices, args.ddp_strategy, steps)
    settings = {"devices": devices, "strategy": args.ddp_strategy, "steps": steps, "recipe": str(train_launcher.RECIPE)}
    common.report("bench/train.py --launcher", rows, common.environment(), settings,
                  "bench-launcher.json" if args.json is None else args.json or None)
    return 0


def _vocab(spec: dict[str, Any]) -> int:
    from astrai_train.model import ModelConfig

    return ModelConfig.from_preset(spec["preset"], **spec["overrides"]).vocab_size


def scaling_rows(rows: list[Row], spec: dict[str, Any]) -> list[Row]:
    by_key = {r.key: r for r in rows}
    one = by_key.get(key("train", SYSTEMS["astrai-compile" if spec["ddp_compile"] else "astrai"], TOKS))
    many = by_key.get(key("train", ddp_system(spec), TOKS))
    n = spec["ddp_devices"]
    value = many.value / (n * one.value) * 100 if one and many and one.value and many.value else None
    return [Row("train", ddp_system(spec), "scaling efficiency %", value,
                note=f"tokens/s on {n} GPUs / ({n} x tokens/s on 1), micro-batch per GPU unchanged")]


if __name__ == "__main__":
    sys.exit(main())
