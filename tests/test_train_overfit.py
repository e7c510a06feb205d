"""Each objective, through the real LightningModule and Trainer, overfits one fixed batch."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from astrai_train.objectives import MODULES
from astrai_train.objectives.base import model_config_for
from astrai_train.objectives.config import load_recipe
from astrai_train.objectives.rewards import REWARDS, register_reward

TINY = ["model.preset=tiny", "model.overrides={dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 16, "
        "dim_ffn: 128, max_len: 128}", "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.schedule=constant"]


class Repeat(Dataset):
    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


class History(L.Callback):
    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


def fit(objective: str, batch: dict, steps: int, overrides: list[str], tokenizer=None, key: str = "train/loss"):
    recipe = load_recipe(None, [f"objective={objective}", *TINY, *overrides])
    vocab = tokenizer.vocab_size if tokenizer is not None else 256
    L.seed_everything(0, verbose=False)
    config = model_config_for(recipe.model, vocab)
    extra = {"tokenizer": tokenizer} if objective == "grpo" else {}
    module = MODULES[objective](recipe, config, **extra)
    history = History(key)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[history],
                        gradient_clip_val=1.0)
    loader = DataLoader(Repeat(batch, steps), batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    return history.values


def random_windows(b: int, t: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t + 1), generator=g)
    return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}


def test_seq_overfits() -> None:
    losses = fit("seq", random_windows(4, 32), 40, ["optim.lr=1e-2"])
    assert losses[0] > 5.0  # ~ln(256) at init
    assert losses[-1] < 0.3 * losses[0], losses


def test_sft_overfits_and_ignores_unmasked_tokens() -> None:
    batch = random_windows(4, 32, seed=1)
    mask = torch.zeros(4, 32)
    mask[:, 20:] = 1
    batch["loss_mask"] = mask
    losses = fit("sft", batch, 30, ["optim.lr=1e-2"])
    assert losses[-1] < 0.3 * losses[0], losses


def dpo_batch() -> dict:
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 256, (4, 12), generator=g)
    chosen = torch.cat([prompt, torch.randint(0, 256, (4, 10), generator=g)], 1)
    rejected = torch.cat([prompt, torch.randint(0, 256, (4, 8), generator=g)], 1)
    cm = torch.zeros_like(chosen, dtype=torch.bool)
    cm[:, 12:] = True
    rm = torch.zeros_like(rejected, dtype=torch.bool)
    rm[:, 12:] = True
    return {"chosen_ids": chosen, "chosen_loss_mask": cm, "rejected_ids": rejected, "rejected_loss_mask": rm}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_overfits(loss_type: str) -> None:
    losses = fit("dpo", dpo_batch(), 25, ["optim.lr=3e-3", f"dpo.loss_type={loss_type}", "dpo.beta=0.5"])
    assert losses[0] == pytest.approx(0.6931 if loss_type == "sigmoid" else 1.0, rel=1e-3)  # policy == reference
    assert losses[-1] < 0.2 * losses[0], losses


def vowel_share(completion: str, answer: str, prompt: str) -> float:
    """A dense reward with spread across samples: the share of vowels among the completion's characters."""
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(1, len(completion))


def test_grpo_raises_reward(tokenizer_dir) -> None:
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    if "test_vowel_share" not in REWARDS:
        register_reward("test_vowel_share")(vowel_share)
    prompts = [tok.encode("To be, or not to be"), tok.encode("Now is the winter")]
    batch = {"prompts": prompts, "answers": ["", ""]}
    rewards = fit("grpo", batch, 16, ["optim.lr=3e-2", "grpo.group_size=8", "grpo.max_new_tokens=4",
                                      "grpo.rewards=[test_vowel_share]", "grpo.kl_coef=0.01", "grpo.rollout=engine"],
                  tokenizer=tok, key="train/reward")
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert end > start + 0.2, rewards  # ~0.28 at init


def test_activation_checkpointing_keeps_loss_and_gradients() -> None:
    batch = random_windows(2, 16, seed=3)
    grads = []
    for ac in ("false", "true"):
        recipe = load_recipe(None, [*TINY, f"model.activation_checkpointing={ac}"])
        torch.manual_seed(0)
        module = MODULES["seq"](recipe, model_config_for(recipe.model, 256))
        loss, _, _ = module.compute_loss(batch)
        loss.backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                      for n, p in module.model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_rollout_engine_grows_with_the_batch(tokenizer_dir, one_thread) -> None:
    """A rollout batch larger than the first one gets an engine sized for it (no preemption
    storm), and one no larger reuses the engine it has."""
    from astrai_train.model import ModelConfig, Transformer
    from astrai_train.objectives.rollout import RolloutSampler
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    dim_ffn=48, max_len=64))
    sampler = RolloutSampler(model, tok, group_size=3, max_new_tokens=6, temperature=1.0, backend="engine")
    small = sampler.sample([[5, 6, 7]], seed=0)
    first = sampler._llm
    big = sampler.sample([[5, 6, 7, 8, 9, 10, 11, 12]] * 6, seed=1)
    assert len(small) == 3 and len(big) == 18 and all(len(c) <= 6 for c in big)
    assert sampler._llm is not first and sampler._llm.engine.stats().num_preemptions_total == 0
    grown = sampler._llm
    sampler.sample([[5, 6, 7]] * 2, seed=2)
    assert sampler._llm is grown
