"""astrai_train: model, tokenizer, data and Lightning objectives for small decoder-only LLMs.

One folder per layer, each importing only the ones below it:

    cli/          `astrai tokenizer | tasks | prepare | train | export | export-hf | eval`: wiring only
    objectives/   one LightningModule per objective (SEQ, SFT, DPO, GRPO) and the run that drives them
    data/         text/JSONL -> HDF5, datasets, the resumable sampler, the DataModule, the demo's tasks
    adapters/     LoRA layers wrapped around the model from outside, merged for export, PEFT's file format
    tokenizer/    byte-level BPE, chat templates, incremental detokenizer (no torch)
    model/        ModelConfig, Transformer, model directories, HF interop (no Lightning)

demo.py (`make demo`), evaluate.py (`astrai eval`'s metrics) and docgen.py (docs/configuration.md)
sit beside them. The serving side (astrai_serve) imports model/ and tokenizer/; of the layers here
only objectives/rollout.py (GRPO's in-process engine) imports astrai_serve, and cli/ and demo.py,
which drive both sides.
tests/test_layout.py fails on an import cycle or an import against these layers.
"""
