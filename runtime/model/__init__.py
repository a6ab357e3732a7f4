"""The model's math: config, decoder, attention, quantized and LoRA linear modules, and the loader
that builds one from a checkpoint."""
