"""The torch-free edge runtime: ONNX exports (`quadapt export-onnx`) run by onnxruntime alone.

`model.EdgeModel` opens an export (one session, its adapters, KV buffers bound in place),
`text.EdgeTokenizer` its tokenizer and chat template, `generate.generate_text` / `generate_ids`
the reference generator's loop, `sampling` its processors in numpy, `perplexity` its scoring.
Every module here imports only numpy, onnxruntime, tokenizers, jinja2 and torch-free quadapt
modules (errors, chat_template, chat_encoding); `command.py` is `quadapt run-onnx`. Nothing here exports a model.
This file imports nothing, so its names can be read where onnxruntime is not installed.
"""

MANIFEST = "quadapt_edge.json"  # what makes a directory an export: written by converters/onnx_export.py, read first here
