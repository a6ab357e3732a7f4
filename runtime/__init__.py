"""The runtime: model config, model, loader, tokenizer, sampling and generation."""
