"""The torch-free edge runtime: ONNX exports (`quadapt export-onnx`) run by onnxruntime alone.

`model.EdgeModel` opens an export (one session, its adapters, KV buffers bound in place),
`generate.generate_text` / `generate_ids` run the reference generator's shared loop
(`runtime.generation`) over it, `sampling` holds the processors in numpy over the shared
`SamplingParams`, `perplexity` its scoring. The text is the runtime's own torch-free core: read an
export's tokenizer with `runtime.text.tokenizer.Tokenizer.from_dir(export)` and its prompts with
`encode_prompt`. Every module here imports only numpy, onnxruntime, tokenizers, jinja2 and
torch-free quadapt modules. Nothing here exports a model.
This file imports nothing, so its names can be read where onnxruntime is not installed.
"""

MANIFEST = "quadapt_edge.json"  # what makes a directory an export: written by converters/onnx_export.py, read first here
