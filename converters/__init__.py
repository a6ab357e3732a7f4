"""Producing what quadapt and the field's tools load: quantized checkpoints (`convert.py`, planned by
`plan.py`, with round-to-nearest, MSE, GPTQ or AWQ rounding, written as compressed-tensors or
bitsandbytes), the same quantization of a loaded model in memory (`in_memory.py`), PEFT adapters
normalized, extracted from a fine-tune or merged into their base, ONNX exports for the edge runtime,
and the default model fetched. Writes are atomic (`writer.py`). Reading checkpoints and adapters
is `runtime.checkpoints`; the commands that call these are `cli`."""
