"""LoRA (astrai_train/adapters/): the layer's training and inference paths, recipe checks, SFT/DPO/
GRPO runs that train only the adapters of a frozen base, the DPO/GRPO reference as the base with
adapters off, rollouts through the engine on the adapted weights, and the saved adapter as `peft`
loads it on the `astrai export-hf` directory of the base, with equal logits."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from astrai_train.adapters import (AdapterSpec, LoRALinear, apply_lora, disable_adapters, load_adapter, lora_layers,
                                   merge_lora, remove_lora)
from astrai_train.model import ModelConfig, Transformer
from astrai_train.objectives import runner
from astrai_train.objectives.config import RecipeError, load_recipe
from train_support import ROOT, parse, prepare_data, recipe_overrides, weights

LORA = ["lora.rank=4", "lora.alpha=8"]
pytestmark = pytest.mark.usefixtures("one_thread")   # toy-sized matmuls: a second thread only spins


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir, corpus_dir) -> dict[str, Path]:
    return prepare_data(tokenizer_dir, corpus_dir, tmp_path_factory.mktemp("lora_data"))


def lora_argv(objective, data, tokenizer_dir, base_dir, out, name, steps, *extra, batch_size=4,
              lora=LORA) -> list[str]:
    """A tiny run from the pretrained tiny model directory (the frozen base), with LoRA on."""
    return recipe_overrides(objective, data[objective], tokenizer_dir, out, name, steps, batch_size=batch_size,
                            extra=["model.preset=null", "model.overrides={}", f"model.init_from={base_dir}",
                                   *lora, *extra])


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64,
                                   max_len=64, use_qk_norm=True, **kw))


def randomize_adapters(model: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """B starts at zero (adapted == base); give it values so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)   # in place, on any device


# ---- the layer --------------------------------------------------------------------------------

def test_lora_layer_trains_low_rank_and_reads_merged_weights_at_inference(monkeypatch) -> None:
    base = tiny()
    model = copy.deepcopy(base)
    layers = apply_lora(model, AdapterSpec(rank=4, alpha=8.0))
    assert len(layers) == 2 * 7 and all(isinstance(m, LoRALinear) for m in layers.values())
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)   # B = 0: the base exactly
    randomize_adapters(model)
    # The training forward runs x W^T + s (x A^T) B^T: it never builds a merged [out, in] weight.
    merged_weight = LoRALinear.merged_weight
    monkeypatch.setattr(LoRALinear, "merged_weight", lambda self: pytest.fail("training merged a weight"))
    train_out = model(ids)
    train_out.float().pow(2).mean().backward()
    monkeypatch.setattr(LoRALinear, "merged_weight", merged_weight)
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    # Names of the base weights are unchanged; the adapters sit beside them.
    assert set(base.state_dict()) <= set(model.state_dict())
    with torch.no_grad():
        inference = model(ids)                                   # reads W + s B A through `.weight`
        merged = merge_lora(copy.deepcopy(model))(ids)
        with disable_adapters(model):
            torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
        assert not torch.allclose(inference, base(ids), atol=1e-3)
    torch.testing.assert_close(train_out.detach(), inference, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, inference, rtol=0, atol=0)
    # Activation checkpointing recomputes the blocks in backward: the same adapter gradients.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from astrai_train.model.transformer import Block

    wrapped = copy.deepcopy(model)
    wrapped.zero_grad()
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, Block))
    wrapped(ids).float().pow(2).mean().backward()
    assert lora_layers(wrapped).keys() == lora_layers(model).keys()   # names without the wrapper
    for name, layer in lora_layers(wrapped).items():
        torch.testing.assert_close(layer.lora_B.grad, lora_layers(model)[name].lora_B.grad, rtol=1e-5, atol=1e-7)
    stripped = remove_lora(copy.deepcopy(model))
    assert not lora_layers(stripped) and stripped.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(stripped.state_dict()[k], v) for k, v in base.state_dict().items())


def test_lora_refuses_fusion_and_unknown_targets() -> None:
    from astrai_train.model import fuse_projections

    model = tiny()
    apply_lora(model, AdapterSpec(rank=2, alpha=2.0, target_modules=("q_proj", "gate_proj")))
    with pytest.raises(RuntimeError, match="merge the adapters first"):
        fuse_projections(model)   # would bake the adapter into q|k|v once and add it again on top
    with pytest.raises(ValueError, match=r"\['kv_a_proj', 'kv_b_proj'\] matches no Linear layer"):
        apply_lora(tiny(), AdapterSpec(rank=2, alpha=2.0, target_modules=("kv_a_proj", "kv_b_proj")))
    # As in PEFT, a name the model lacks is skipped when another one matches (MLA's, on a GQA model).
    some = apply_lora(tiny(), AdapterSpec(rank=2, alpha=2.0, target_modules=("q_proj", "kv_b_proj")))
    assert sorted(some) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    fused = tiny()
    fuse_projections(fused)
    with pytest.raises(ValueError, match="fused projections"):
        apply_lora(fused, AdapterSpec(rank=2, alpha=2.0))


@pytest.mark.parametrize("override,message", [
    ("lora.rank=-1", "lora.rank=-1: must be >= 0"),
    ("lora.alpha=0", "lora.alpha=0.0: must be > 0"),
    ("lora.dropout=1", "lora.dropout=1.0: must be in [0, 1)"),
    ("lora.target_modules=[q_proj, qproj]", "lora.target_modules='qproj': not a Linear layer"),
    ("lora.ranks=4", "unknown key 'lora.ranks'"),
])
def test_bad_lora_recipes_name_the_key(override, message) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["lora.rank=8", override])
    assert message in str(err.value)
    assert load_recipe(None).lora.rank == 0   # off by default


# ---- runs ----------------------------------------------------------------------------------------

def test_sft_lora_trains_only_adapters_and_exports_peft_and_merged(data, tokenizer_dir, tiny_model_dir, tmp_path,
                                                                   capsys) -> None:
    from astrai_train.cli import main
    from astrai_train.objectives.checkpointing import read_checkpoint
    from astrai_train.objectives.plots import read_history

    # The documented example recipe (rank 8, alpha 16, dropout 0.05), on the test's data and base.
    argv = lora_argv("sft", data, tokenizer_dir, tiny_model_dir, tmp_path, "sft", 6, "optim.lr=1e-2",
                     "data.window_size=96", f"data.text_path={data['seq']}", lora=[])
    model_dir = runner.train(parse(["--config", str(ROOT / "configs" / "train" / "sft-lora-tiny.yaml"), *argv]))
    run_dir = model_dir.parent
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]          # weights_only=True
    base = weights(tiny_model_dir)
    for key, tensor in base.items():                      # the base, bit for bit
        assert torch.equal(state[f"model.{key}"], tensor), key
    adapters = {k: v for k, v in state.items() if k.endswith("lora_B")}
    assert len(adapters) == 14 and all(v.abs().sum() > 0 for v in adapters.values())
    losses = [v for _, v in read_history(run_dir / "logs")["train/loss"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    # The run's end: model/ merged (servable as is), adapter/ in PEFT's format.
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16.0, "bias": "none"}
    assert config["lora_dropout"] == 0.05
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in set(f.keys())

    # `astrai export` without --merge: the base weights, with the adapter in OUT/adapter.
    split, merged = tmp_path / "split", tmp_path / "merged"
    assert main(["export", str(ckpt), str(split)]) == 0
    assert main(["export", str(ckpt), str(merged), "--merge"]) == 0
    assert str(split / "adapter") in capsys.readouterr().out
    assert all(torch.equal(weights(split)[k], v) for k, v in base.items())
    assert all(torch.equal(weights(merged)[k], v) for k, v in weights(model_dir).items())
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 3, 120]])
    adapted = Transformer.from_pretrained(split)
    load_adapter(adapted, split / "adapter")
    with torch.no_grad():
        ours = adapted(ids)
        torch.testing.assert_close(Transformer.from_pretrained(merged)(ids), ours, rtol=0, atol=1e-5)
        assert not torch.allclose(Transformer.from_pretrained(split)(ids), ours, atol=1e-4)

    # peft loads the adapter on the transformers export of the base, with equal logits.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    assert main(["export-hf", str(split), str(hf_dir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, run_dir / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_lora_run_resumes_exactly(data, tokenizer_dir, tiny_model_dir, tmp_path) -> None:
    from train_support import max_abs_diff

    def run(name: str, *extra: str) -> Path:
        return runner.train(parse(lora_argv("sft", data, tokenizer_dir, tiny_model_dir, tmp_path, name, 4,
                                            "optim.lr=1e-2", "data.window_size=96", "lora.dropout=0.1", *extra)))

    straight = run("straight", "checkpoint.every_n_steps=2")
    resumed = run("resumed", "--resume", str(straight.parent / "checkpoints" / "step-0000002.ckpt"))
    assert max_abs_diff(weights(straight), weights(resumed)) == 0.0
    from safetensors.torch import load_file

    a, b = (load_file(str(d.parent / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert max_abs_diff(a, b) == 0.0


def test_dpo_lora_reference_is_the_base_with_adapters_off(data, tokenizer_dir, tiny_model_dir, tmp_path) -> None:
    from astrai_train.objectives.reference import AdaptersOff

    argv = lora_argv("dpo", data, tokenizer_dir, tiny_model_dir, tmp_path, "dpo", 2, "data.max_length=64",
                     "optim.lr=1e-2")
    trainer, module, prepared = runner.setup_run(parse(argv))
    assert isinstance(module.reference, AdaptersOff) and module.reference.model is module.model   # no copy
    randomize_adapters(module.model)
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 3, 120]])
    base = Transformer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        torch.testing.assert_close(module.reference.logits(ids), base(ids), rtol=0, atol=0)
        assert not torch.allclose(module.model(ids), base(ids), atol=1e-3)   # the policy has moved
    assert all(m.adapters_enabled for m in lora_layers(module.model).values())  # switched back on
    with torch.no_grad():
        for layer in lora_layers(module.model).values():
            layer.lora_B.zero_()
    runner.fit(trainer, module, prepared)
    state = {k.removeprefix("model."): v for k, v in module.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in weights(tiny_model_dir).items())
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(module.model).values())


def test_grpo_lora_rollouts_see_the_adapted_weights(data, tokenizer_dir, tiny_model_dir, tmp_path) -> None:
    from astrai_train.objectives.reference import AdaptersOff
    from astrai_train.objectives.rollout import RolloutSampler, engine_available
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    backend = "engine" if engine_available() else "generate"
    prompts = [tok.encode("What is 2 + 4?"), tok.encode("What is 3 + 6?")]

    def sample(model: torch.nn.Module) -> list[list[int]]:
        return RolloutSampler(model, tok, group_size=3, max_new_tokens=6, temperature=1.0,
                              backend=backend).sample(prompts, seed=7)

    base = Transformer.from_pretrained(tiny_model_dir)
    model = copy.deepcopy(base)
    apply_lora(model, AdapterSpec(rank=4, alpha=8.0))
    assert sample(model) == sample(base)                 # B = 0: the base's samples
    randomize_adapters(model, std=1.0)
    adapted = sample(model)
    assert adapted == sample(merge_lora(copy.deepcopy(model))) and adapted != sample(base)

    grpo = ["grpo.group_size=2", "grpo.max_new_tokens=4", "grpo.rewards=[train_support:vowel_share]",
            "optim.lr=1e-2"]
    trainer, module, prepared = runner.setup_run(parse(lora_argv("grpo", data, tokenizer_dir, tiny_model_dir,
                                                                 tmp_path, "grpo", 2, *grpo, batch_size=2)))
    assert isinstance(module.reference, AdaptersOff)
    out = runner.fit(trainer, module, prepared)
    assert (out.parent / "adapter" / "adapter_model.safetensors").is_file()
    rows = (out.parent / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/reward" in rows and "train/kl" in rows
    state = {k.removeprefix("model."): v for k, v in module.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in weights(tiny_model_dir).items())


def test_lora_with_fsdp_is_refused_before_training(data, tokenizer_dir, tiny_model_dir, tmp_path, capsys) -> None:
    argv = lora_argv("sft", data, tokenizer_dir, tiny_model_dir, tmp_path, "fsdp", 2, "trainer.strategy=fsdp")
    assert runner.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.rank=4 with trainer.strategy=fsdp" in err[0], err


# ---- on a GPU (`make test-gpu`) -------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_cuda_graphs_replay_with_the_live_adapters() -> None:
    """The engine's decode graphs capture the merge (W + s B A) itself, not its result: after an
    in-place update of B (an optimizer step), replays generate what a model with the new merged
    weights generates. fp32 and no compile, so both engines run the same kernels bit for bit."""
    from astrai_serve import LLM, SamplingParams

    dev = torch.device("cuda")
    base = tiny(init_std=0.15).to(dev)
    model = copy.deepcopy(base)
    apply_lora(model, AdapterSpec(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (8,), generator=g)]
    params = [SamplingParams(temperature=0.0, max_tokens=16, detokenize=False) for _ in prompts]
    args = {"num_pages": 64, "max_num_seqs": 8, "compile_decode": False}

    def merged_weights_of(m: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            merged = {n: layer.merged_weight().clone() for n, layer in lora_layers(m).items()}
        out = remove_lora(copy.deepcopy(m))
        with torch.no_grad():
            for n, module in out.named_modules():
                if n in merged:
                    module.weight.copy_(merged[n])
        return out

    def gen(llm) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    randomize_adapters(model, std=0.5, seed=1)
    model.eval()
    llm = LLM.from_model(model, None, **args)
    assert llm.engine.config.resolved_cuda_graphs()
    first = gen(llm)
    assert first == gen(LLM.from_model(merged_weights_of(model), None, **args))
    assert first != gen(LLM.from_model(base.eval(), None, **args))
    randomize_adapters(model, std=0.5, seed=2)   # in place, as an optimizer step: the same storage
    llm.engine.reset_prefix_cache()
    second = gen(llm)
    assert second == gen(LLM.from_model(merged_weights_of(model), None, **args)) and second != first
