"""Checkpoint readers and writers: HF safetensors directories and GGUF files in, standard formats out."""
