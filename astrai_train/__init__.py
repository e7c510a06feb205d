"""astrai_train: model, tokenizer, data and Lightning objectives for small decoder-only LLMs."""
