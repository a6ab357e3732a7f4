"""QLoRA training on the runtime's quantized modules."""
