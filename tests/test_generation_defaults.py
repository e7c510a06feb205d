"""generation_config.json: the model's sampling defaults fill what a request leaves unset (vLLM's
`--generation-config auto`), `none` turns them off, and `astrai export-hf` writes the file with
every id astrai stops at, so transformers' generate stops where astrai does."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from astrai_serve import LLM
from astrai_serve.core.request_checks import RequestChecker
from astrai_serve.engine.generation_defaults import generation_defaults
from astrai_serve.proto import generate_pb2 as pb
from astrai_train.tokenizer import Tokenizer

QWEN3_STYLE = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "max_new_tokens": 7,
               "eos_token_id": [1, 2], "repetition_penalty": 1.05}


def test_defaults_read_the_sampling_fields_only(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN3_STYLE))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                             "repetition_penalty": 1.05, "max_tokens": 7}
    assert generation_defaults(tmp_path, "none") == {}
    assert generation_defaults(tmp_path / "nothing-here-is-a-dir-but-auto-reads-model-dir") == {}
    with pytest.raises(ValueError, match="--generation-config '/nope': no generation_config.json"):
        generation_defaults(tmp_path, "/nope")
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match="temperature must be a number, got 'hot'"):
        generation_defaults(tmp_path)


def test_request_fields_win_over_the_models_defaults(tiny_model_dir):
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    checker = RequestChecker(tok, 256, tok.vocab_size, "", defaults={"temperature": 0.6, "top_k": 20, "max_tokens": 7})
    unset = checker.sampling_params(pb.SamplingParams(), 10, "prompt")
    assert (unset.temperature, unset.top_k, unset.max_tokens) == (0.6, 20, 7)
    mine = checker.sampling_params(pb.SamplingParams(temperature=0.0, max_tokens=3), 10, "prompt")
    assert (mine.temperature, mine.top_k, mine.max_tokens) == (0.0, 20, 3)
    near_end = checker.sampling_params(pb.SamplingParams(), 252, "prompt")   # the default max_tokens fits the room
    assert near_end.max_tokens == 4
    plain = RequestChecker(tok, 256, tok.vocab_size, "").sampling_params(pb.SamplingParams(), 10, "prompt")
    assert plain.temperature == 1.0 and plain.top_k == 0


def test_llm_generate_without_params_uses_the_models_defaults(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    llm = LLM(model_dir, num_pages=64)
    assert llm.default_sampling_params().temperature == 0.0
    out = llm.generate("To be")[0]
    assert len(out.outputs[0].token_ids) <= 5
    again = llm.generate("To be")[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids          # greedy: the default applied
    assert LLM(model_dir, generation_config="none", num_pages=64).default_sampling_params().temperature == 1.0


def test_export_hf_writes_every_stop_id_for_transformers(tiny_model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from astrai_train.model.hf_export import export_hf

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "generation_config.json").unlink(missing_ok=True)
    out = export_hf(src, tmp_path / "hf")
    stops = sorted(set(Tokenizer.from_pretrained(src).stop_ids))
    config = transformers.GenerationConfig.from_pretrained(out)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    assert sorted(eos) == stops
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(src).encode("To be")])
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    cut = [i for i, t in enumerate(gen) if t in stops]
    assert not cut or cut[0] == len(gen) - 1       # generate stops at the first id astrai stops at
