"""Shared fixtures: the shipped corpus and a tiny random model directory with a real tokenizer."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of toy-sized matmuls: on a 2-core machine a second thread
    only adds OpenMP spin-waiting (and it makes CPU results independent of the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return ROOT / "data" / "shakespeare"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    """A 1024-token byte-level BPE trained on three plays plus a little Chinese text."""
    from astrai_train.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    sample = out / "sample.txt"
    text = "".join(gzip.open(corpus_dir / f"{n}_gut.txt.gz", "rt").read()
                   for n in ("hamlet", "macbeth", "tempest"))
    sample.write_text(text + "\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n")
    train_tokenizer([str(sample)], vocab_size=1024, out_dir=out)
    sample.unlink()
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random-init tiny GQA model (2 layers x 64) saved as a model directory with the tokenizer."""
    from astrai_train.model import ModelConfig, Transformer
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         dim_ffn=128, max_len=512, use_qk_norm=True, init_std=0.05)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model")
    Transformer(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
