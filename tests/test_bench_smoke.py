"""CPU smoke runs of the benchmarks at toy sizes: each prints its one table and writes its JSON,
with the astrai rows AND the peer rows measured in the same run (real engine, real `astrai serve`
subprocess, real openai client, real Lightning Trainer, real transformers models)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if f"bench_{name}" not in sys.modules:  # a unique name: the repository root has a train.py too
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[f"bench_{name}"]


def _rows(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    assert data["environment"]["device"] and data["environment"]["torch"]
    return {f"{r['workload']}|{r['system']}|{r['metric']}": r for r in data["rows"]}


def _positive(rows: dict[str, dict], key: str) -> float:
    assert key in rows, f"missing row {key}; have {sorted(rows)}"
    value = rows[key]["value"]
    assert value is not None and value > 0, f"{key}: {rows[key]}"
    return value


def test_serve_bench_tiny(tmp_path, capsys):
    serve = _load("serve")
    out = tmp_path / "serve.json"
    assert serve.main(["--tiny", "--repeats", "1", "--api-server-count", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "workload" in table and "ratio vs peer" in table
    rows = _rows(out)
    s = serve.TINY
    fixed = f"output tok/s ({s.fixed_output} out)"
    astrai = _positive(rows, f"W1|astrai|{fixed}")
    for peer in ("hf generate_batch", "hf generate"):
        assert peer in table
        peer_value = _positive(rows, f"W1|{peer}|{fixed}")
        assert rows[f"W1|astrai|{fixed}"]["ratios"][peer] == pytest.approx(astrai / peer_value)
    var = f"output tok/s ({s.output_range[0]}-{s.output_range[1]} out)"
    default = _positive(rows, f"W1|astrai|{var}")
    eager = _positive(rows, f"W1|astrai --enforce-eager|{var}")
    assert rows[f"W1|astrai --enforce-eager|{var}"]["ratios"]["astrai"] == pytest.approx(eager / default)
    _positive(rows, "S|astrai cold start|startup s")     # the first start over an empty cache directory
    _positive(rows, "S|astrai warm start|startup s")
    _positive(rows, "W2|astrai (prefix cache on)|output tok/s")
    _positive(rows, "W2|astrai (prefix cache off)|output tok/s")
    assert rows["W2|astrai (prefix cache on)|prompt tokens from cache %"]["value"] > 0
    _positive(rows, "W3|astrai|decode ms/token")
    _positive(rows, "W3|roofline|decode ms/token")
    w4 = _positive(rows, "W4|astrai REST|output tok/s")
    assert rows["W4|astrai REST|output tok/s"]["note"].startswith(f"{s.num_requests}/{s.num_requests} ok")
    assert rows["W4|astrai REST|output tok/s"]["ratios"]["astrai"] > 0 and w4 > 0
    words = rows["W4|astrai REST|output tok/s"]["note"].split("daemon CPU busy ", 1)[1].split()
    busy = {name: float(pct.rstrip("%;")) for name, pct in zip(words[0::2], words[1::2])}
    assert set(busy) == {"core", "daemon", "engine", "facade"} and busy["engine"] > 0 and busy["facade"] > 0
    assert json.loads(out.read_text())["settings"]["serve_flags"] == ["--api-server-count", "2"]
    assert _positive(rows, "W4|astrai REST|TTFT p99 ms") >= _positive(rows, "W4|astrai REST|TTFT p50 ms")
    _positive(rows, "W4|astrai REST|TPOT p50 ms")
    _positive(rows, "W5|astrai|prefill TFLOP/s")
    _positive(rows, "W5|astrai|output tok/s")
    ttft = _positive(rows, "W6|astrai|time to first token ms")
    sdpa = _positive(rows, "W6|hf sdpa forward|time to first token ms")
    assert rows["W6|astrai|time to first token ms"]["ratios"]["hf sdpa forward"] == pytest.approx(ttft / sdpa)


def test_serve_bench_tiny_moe_w1(tmp_path, capsys):
    """The MoE row's CPU smoke: `--tiny --preset moe-tiny --workloads W1`, astrai beside both HF peers
    (the exported Qwen3MoeForCausalLM) in the same run."""
    serve = _load("serve")
    out = tmp_path / "serve-moe.json"
    assert serve.main(["--tiny", "--preset", "moe-tiny", "--workloads", "W1", "--skip-eager", "--repeats", "1",
                       "--json", str(out)]) == 0
    assert "hf generate_batch" in capsys.readouterr().out
    rows = _rows(out)
    assert json.loads(out.read_text())["settings"]["preset"] == "moe-tiny"
    fixed = f"output tok/s ({serve.TINY.fixed_output} out)"
    astrai = _positive(rows, f"W1|astrai|{fixed}")
    for peer in ("hf generate_batch", "hf generate"):
        assert rows[f"W1|astrai|{fixed}"]["ratios"][peer] == pytest.approx(astrai / _positive(rows, f"W1|{peer}|{fixed}"))


def test_serve_bench_structured_tiny(tmp_path, capsys):
    """W7 (not in the default workloads): unconstrained tok/s beside and without JSON-schema
    neighbours, and a new schema's time to first token beside a cached one's."""
    serve = _load("serve")
    assert "W7" not in serve.DEFAULT_WORKLOADS
    out = tmp_path / "w7.json"
    assert serve.main(["--tiny", "--workloads", "W7", "--repeats", "1", "--json", str(out)]) == 0
    assert "unconstrained output tok/s" in capsys.readouterr().out
    rows = _rows(out)
    free = _positive(rows, f"W7|{serve.W7_FREE}|{serve.W7_METRIC}")
    mixed = _positive(rows, f"W7|{serve.W7_MIXED}|{serve.W7_METRIC}")
    assert rows[f"W7|{serve.W7_MIXED}|{serve.W7_METRIC}"]["ratios"][serve.W7_FREE] == pytest.approx(mixed / free)
    new = _positive(rows, f"W7|{serve.W7_NEW}|{serve.TTFT}")
    cached = _positive(rows, f"W7|{serve.W7_CACHED}|{serve.TTFT}")
    assert rows[f"W7|{serve.W7_NEW}|{serve.TTFT}"]["ratios"][serve.W7_CACHED] == pytest.approx(new / cached)


def test_prefill_flops_count_every_matmul_weight_and_the_causal_pairs():
    # The matmul term from the model's own weights, not from the formula's config arithmetic.
    import torch

    from astrai_train.model import ModelConfig, Transformer

    serve = _load("serve")
    config = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, dim_ffn=96, vocab_size=100)
    with torch.device("meta"):
        model = Transformer(config)
    layer_weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    lengths = [3, 10]
    hd = config.dim // config.n_heads
    pairs = sum(n * (n + 1) // 2 for n in lengths)  # a causal prompt of n tokens scores n(n+1)/2 pairs
    want = (2 * layer_weights * sum(lengths) + 2 * config.dim * config.vocab_size * len(lengths)
            + config.n_layers * config.n_heads * pairs * 2 * 2 * hd)
    assert serve.prefill_flops(config, lengths) == pytest.approx(want)
    # MoE: the router and the top-k experts of a sparse layer (here layer 1 of 2), not all experts
    moe = config.replace(n_experts=4, n_experts_per_token=2, moe_dim_ffn=32, moe_dense_layers=(0,))
    with torch.device("meta"):
        params = dict(Transformer(moe).named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)    # [E, ., .]: a token reads k of E
    active = sum(p.numel() for n, p in params.items() if n.startswith("layers.") and p.dim() == 2) + experts * 2 // 4
    want = (2 * active * sum(lengths) + 2 * config.dim * config.vocab_size * len(lengths)
            + config.n_layers * config.n_heads * pairs * 2 * 2 * hd)
    assert serve.prefill_flops(moe, lengths) == pytest.approx(want)


def test_train_bench_tiny(tmp_path, capsys):
    train = _load("train")
    out = tmp_path / "train.json"
    assert train.main(["--tiny", "--json", str(out)]) == 0
    assert "hf Qwen3 loop" in capsys.readouterr().out
    rows = _rows(out)
    astrai = _positive(rows, "train|astrai (Lightning)|tokens/s")
    hf = _positive(rows, "train|hf Qwen3 loop|tokens/s")
    assert rows["train|astrai (Lightning)|tokens/s"]["ratios"]["hf Qwen3 loop"] == pytest.approx(astrai / hf)
    _positive(rows, "train|astrai (Lightning)|step ms")
    _positive(rows, "train|hf Qwen3 loop|step ms")
    assert "MFU %" in {r["metric"] for r in rows.values()}


def test_train_bench_rollouts_tiny(tmp_path, capsys):
    train = _load("train")
    out = tmp_path / "rollouts.json"
    assert train.main(["--tiny", "--grpo-rollouts", "--json", str(out)]) == 0
    assert "rollout tok/s" in capsys.readouterr().out
    rows = _rows(out)
    engine = _positive(rows, "rollout|astrai engine (in-process)|rollout tok/s")
    for peer in ("astrai generate loop", "hf generate"):
        _positive(rows, f"rollout|{peer}|rollout tok/s")
        assert rows["rollout|astrai engine (in-process)|rollout tok/s"]["ratios"][peer] > 0 and engine > 0


def test_synthetic_tokenizer_gives_every_id_text(tmp_path):
    common = _load("common")
    tok = common.synthetic_tokenizer(600, tmp_path)
    assert tok.vocab_size == 600
    assert all(tok.decode([i]) for i in range(5, 600))  # no id decodes to nothing
    words = [tok.decode([i]) for i in range(5 + 256, 600)]  # above the specials and the 256 bytes
    assert all(w.isascii() and w.isalpha() and len(w) >= 2 for w in words)
    assert len(set(words)) == len(words)
    assert tok.encode(words[0] + words[-1]) == [5 + 256, 599]  # the merges rebuild each word
    with pytest.raises(ValueError, match="vocab_size=100"):
        common.synthetic_tokenizer(100, tmp_path / "small")


def test_table_ratios_and_percentiles():
    common = _load("common")
    rows = [common.Row("W1", "a", "tok/s", 300.0, peers=["W1|b|tok/s", "W1|c|tok/s"]),
            common.Row("W1", "b", "tok/s", 100.0), common.Row("W1", "c", "tok/s", None, note="failed: x")]
    common.finish_ratios(rows)
    assert rows[0].ratios == {"b": 3.0}  # no ratio against a peer without a value
    table = common.format_table(rows)
    assert "3.00x b" in table and "failed: x" in table
    assert common.percentile([1, 2, 3, 4], 50) == 2.5 and common.percentile([5], 99) == 5
    assert common.median([3, 1, 2]) == 2


def test_serve_bench_profile_tiny(capsys):
    """--profile prints, per offline workload, the profiler's table and the host functions."""
    serve = _load("serve")
    assert serve.main(["--tiny", "--workloads", "W2,W3", "--skip-peer", "--repeats", "1", "--profile",
                       "--json", ""]) == 0
    out = capsys.readouterr().out
    for label in ("W3", "W2 (prefix cache on)"):
        assert f"--profile {label}: by self CPU time" in out and f"--profile {label}: host functions" in out
    assert "--profile W1" not in out and "Self CPU" in out and "tottime" in out


def test_train_bench_launcher_needs_gpus(capsys):
    """--launcher runs train.py under `lightning run model` on GPUs only: on a CPU one clear error."""
    train = _load("train")
    assert train.main(["--launcher", "--ddp-devices", "2"]) == 2
    assert "this machine has 0 CUDA GPU(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--launcher", "--grpo-rollouts"])
