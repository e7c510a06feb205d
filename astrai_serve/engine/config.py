"""EngineConfig: the serving engine's knobs (batching, KV cache size, device, attention kernel).

Every field is also an `astrai serve` / `astrai generate` flag (astrai_serve/cli/engine_args.py reads
the fields and their comments), so each field keeps its one-line comment on the same line.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # torch is imported only when a device or dtype is resolved: CLI flags stay cheap
    import torch

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")
_IMPLS = ("torch", "triton")
_KV_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16                      # tokens per KV-cache page (prefix-cache granularity)
    max_num_seqs: int | None = None          # most sequences running at once; default from the GPU memory the weights leave (256 from 40 GiB), 64 on CPU
    max_num_batched_tokens: int | None = None  # tokens computed per step (longer prompts prefill in chunks); default 16384 from 40 GiB of GPU, 2048 on CPU
    max_model_len: int | None = None         # longest prompt+output; default the model's max_len
    kv_cache_memory_bytes: int = 256 << 20   # CPU: bytes of KV cache to preallocate
    gpu_memory_utilization: float = 0.85     # GPU: fraction of the memory free after loading the model to use for KV
    num_pages: int | None = None             # exact KV pages to allocate (overrides both memory budgets)
    enable_prefix_cache: bool = True        # reuse KV pages of shared prompt prefixes (radix tree)
    dtype: str | None = None                 # float32 | bfloat16 | float16; default bfloat16 on CUDA, float32 on CPU
    kv_cache_dtype: str = "auto"             # auto (the model dtype) | fp8 (float8 e4m3, scale 1: half the bytes, ~6% per-value error)
    device: str | None = None                # e.g. cuda, cuda:1, cpu; default cuda when available
    seed: int = 0                            # RNG seed for requests that give no seed of their own
    attention_impl: str | None = None        # torch | triton; default triton on CUDA, torch on CPU
    enable_cuda_graphs: bool | None = None   # replay pure-decode steps as CUDA graphs; default on with CUDA + triton
    cuda_graph_max_batch: int | None = None  # largest decode batch run as a graph; default max_num_seqs
    cuda_graph_capture_budget_s: float = 60.0  # capture time at startup; sizes not reached pad up to a larger one
    compile_decode: bool | None = None       # torch.compile the forward the graphs capture (fused kernels; bf16 near-ties may flip); default on with CUDA graphs
    enforce_eager: bool = False              # no CUDA graphs, no torch.compile, no decode GEMV: every step runs eagerly (fast start, slower steps)
    overlap_steps: bool | None = None        # launch step N+1 before step N's text and outputs; default on with CUDA
    async_scheduling: bool | None = None     # launch a pure decode step on the previous step's ids still on the device; default on with CUDA
    fused_kernels: bool | None = None        # Triton add+RMSNorm, SiLU*mul and QK-norm+rotary, one launch each (not ~8); default on with attention_impl triton
    decode_gemv: bool | None = None          # graphed decodes of 1-4 sequences use the Triton GEMV for their matmuls; default on with CUDA graphs
    decode_pdl: bool | None = None           # those GEMVs launch with programmatic dependent launch; default on where supported (Hopper+)
    cascade_attention: bool = True           # decode reads a prefix neighbouring sequences share once per chunk
    compile_cache_dir: str | None = None     # where torch.compile and Triton keep compiled kernels between starts; default ~/.cache/astrai
    structured_compile_wait_s: float = 0.02  # add_request waits this long for a new structured-output grammar to compile (a bad one then fails the call; 0 = never wait); a longer compile runs on while the request waits in the queue

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid engine config {name}={getattr(self, name)!r}: {why}")

        for name in ("page_size", "kv_cache_memory_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_pages", "cuda_graph_max_batch"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(name, "must be a positive integer or None")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise bad("dtype", f"choose one of {', '.join(_DTYPES)}")
        if self.kv_cache_dtype not in _KV_DTYPES:
            raise bad("kv_cache_dtype", f"choose one of {', '.join(_KV_DTYPES)}")
        if self.attention_impl is not None and self.attention_impl not in _IMPLS:
            raise bad("attention_impl", f"choose one of {', '.join(_IMPLS)}")
        if self.compile_cache_dir is not None and not (isinstance(self.compile_cache_dir, str) and self.compile_cache_dir):
            raise bad("compile_cache_dir", "must be a directory path")
        if self.device is not None and not (isinstance(self.device, str) and _DEVICE.match(self.device)):
            raise bad("device", "must look like cpu, cuda or cuda:N")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", "must be an integer")
        for name in ("enable_cuda_graphs", "overlap_steps", "decode_gemv", "decode_pdl", "async_scheduling",
                     "compile_decode", "fused_kernels"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true, false or None (auto)")
        for name in ("enforce_eager", "cascade_attention"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.enforce_eager:
            clash = [n for n in ("enable_cuda_graphs", "compile_decode", "decode_gemv", "decode_pdl") if getattr(self, n)]
            if clash:
                raise ValueError(f"invalid engine config enforce_eager=True with {clash[0]}=True: enforce_eager turns "
                                 f"off CUDA graphs, torch.compile and the decode GEMV; drop one of the two")
        budget = self.cuda_graph_capture_budget_s
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise bad("cuda_graph_capture_budget_s", "must be a positive number of seconds")
        wait = self.structured_compile_wait_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < float("inf"):
            raise bad("structured_compile_wait_s", "must be a number of seconds >= 0")

    @classmethod
    def build(cls, config: "EngineConfig | None" = None, **overrides: Any) -> "EngineConfig":
        """`config` (or the defaults) with keyword overrides; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown engine setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(config or cls(), **overrides)

    # ---- resolved defaults -------------------------------------------------------------------
    def torch_device(self) -> "torch.device":
        import torch

        if self.device is not None:
            dev = torch.device(self.device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"engine device={self.device!r} but CUDA is not available")
            return dev
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def torch_dtype(self) -> "torch.dtype":
        import torch

        if self.dtype is not None:
            return getattr(torch, _DTYPES[self.dtype])
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32

    def torch_kv_dtype(self) -> "torch.dtype":
        """What the KV cache stores: the model dtype, or float8 e4m3 with no scale (K after the
        q/k norm and V stay far inside its +-448 range). The attention kernels widen it back to
        the model dtype as they load it, so only the stored values round."""
        import torch

        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else self.torch_dtype()

    def resolved_attention_impl(self) -> str:
        if self.attention_impl is not None:
            return self.attention_impl
        return "triton" if self.torch_device().type == "cuda" else "torch"

    def resolved_cuda_graphs(self) -> bool:
        """Whether decode steps run as CUDA graphs: they need the device and a capturable kernel
        (the torch reference reads lengths back to the host, which a graph cannot do)."""
        capturable = self.torch_device().type == "cuda" and self.resolved_attention_impl() == "triton"
        if self.enable_cuda_graphs is None:
            return capturable and not self.enforce_eager
        if self.enable_cuda_graphs and not capturable:
            raise ValueError(f"invalid engine config enable_cuda_graphs=True: CUDA graphs need a CUDA device and "
                             f"attention_impl='triton' (device={self.torch_device()}, "
                             f"attention_impl={self.resolved_attention_impl()!r})")
        return self.enable_cuda_graphs

    def resolved_decode_gemv(self) -> bool:
        """Whether small graphed decodes use the Triton GEMV (bench/gemv.py: 1.2-3.9x cuBLAS at
        batch 1 on an H200; W3 1.61 -> 1.33 ms/token). It only runs inside CUDA graphs."""
        graphs = self.resolved_cuda_graphs()
        if self.decode_gemv and not graphs:
            raise ValueError("invalid engine config decode_gemv=True: the GEMV runs inside CUDA graphs, "
                             "which are off (enable_cuda_graphs, a CUDA device and attention_impl='triton')")
        return graphs if self.decode_gemv is None else self.decode_gemv

    def resolved_decode_pdl(self) -> bool:
        """Whether the decode GEMVs launch with programmatic dependent launch (each reads its first
        weight tile while the kernel before it finishes: bench/gemv.py --chain on an H200, a
        batch-1 step's 112 layer GEMVs 523 -> 372 µs). Needs the GEMV and a Hopper-or-later GPU."""
        if self.decode_pdl is False:
            return False
        supported = False
        if self.resolved_decode_gemv():          # (Triton is imported only where the GEMV runs)
            from astrai_serve.kernels.triton_gemv import pdl_supported

            supported = pdl_supported(self.torch_device())
        if self.decode_pdl and not supported:
            raise ValueError(f"invalid engine config decode_pdl=True: it needs decode_gemv and a compiled Triton "
                             f"kernel on a GPU of compute capability 9.0+ (device={self.torch_device()})")
        return supported

    def resolved_compile_decode(self) -> bool:
        """Whether the forward the graphs capture (and the eager steps beside them) runs through
        torch.compile: on by default wherever graphs are, as vLLM does. Without graphs the
        compiled forward would re-launch its kernels from Python each step, so it is not offered."""
        graphs = self.resolved_cuda_graphs()
        if self.compile_decode and not graphs:
            raise ValueError("invalid engine config compile_decode=True: the compiled forward runs inside CUDA graphs, "
                             "which are off (enable_cuda_graphs, enforce_eager, a CUDA device and attention_impl='triton')")
        return graphs if self.compile_decode is None else self.compile_decode

    def resolved_fused_kernels(self) -> bool:
        """Whether the forward's norms, activation and QK-norm + rotary run as the fused Triton
        ops (kernels/fused_ops.py): by default wherever the Triton attention runs. True on a CPU
        runs the same ops as torch math (tests)."""
        return self.resolved_attention_impl() == "triton" if self.fused_kernels is None else self.fused_kernels

    def resolved_overlap_steps(self) -> bool:
        return self.torch_device().type == "cuda" if self.overlap_steps is None else self.overlap_steps

    def resolved_async_scheduling(self) -> bool:
        return self.torch_device().type == "cuda" if self.async_scheduling is None else self.async_scheduling

    def resolved_graph_max_batch(self) -> int:
        seqs = self.resolved_max_num_seqs()
        return min(self.cuda_graph_max_batch or seqs, seqs)

    def batch_limits(self, headroom_bytes: int | None = None) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens): the fields where set, else sized from
        `headroom_bytes`, the device memory the model's weights leave (None: a CPU).

        Why these sizes: decode throughput grows with the batch until the KV reads dominate
        (W1 on an H100: 64 sequences 5.6k out tok/s, 256 6.2k uncompiled; vLLM also starts at
        256 on such GPUs), and a prefill chunk of 16k tokens keeps the matmuls large enough
        for the tensor cores while one step's activations stay far below the KV cache (a
        0.6B model's 16k-token step ~1 GiB). A smaller GPU, or one mostly filled by the
        weights, gets a smaller batch so the KV cache can still hold every running sequence."""
        gib = 1 << 30
        if headroom_bytes is None:
            seqs, tokens = 64, 2048
        elif headroom_bytes >= 40 * gib:
            seqs, tokens = 256, 16384
        elif headroom_bytes >= 16 * gib:
            seqs, tokens = 128, 8192
        else:
            seqs, tokens = 64, 4096
        return (self.max_num_seqs or seqs, self.max_num_batched_tokens or tokens)

    def resolved_max_num_seqs(self) -> int:
        if self.max_num_seqs is None:
            raise RuntimeError("max_num_seqs is sized by the engine at startup: call EngineConfig.sized() first")
        return self.max_num_seqs

    def sized(self, headroom_bytes: int | None = None) -> "EngineConfig":
        """This config with the batch limits filled in (batch_limits): what the engine runs."""
        seqs, tokens = self.batch_limits(headroom_bytes)
        return dataclasses.replace(self, max_num_seqs=seqs, max_num_batched_tokens=tokens)
