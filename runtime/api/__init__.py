"""The in-process front doors: `load`, `LLM`/`AsyncLLM`, offline batches, perplexity and the
reference generator."""
