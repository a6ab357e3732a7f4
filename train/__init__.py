"""QLoRA training: LoRA factors trained over the runtime's packed, frozen 4-bit base.

The base stays as the runtime holds it (`NF4Linear` or `PackedIntLinear`, packed and frozen) and
runs through the same dequant-matmul ops (`train.autograd`: forward qmatmul, backward
grad_input = grad_output @ dequant(W), no weight gradient); only the LoRA factors beside it
train (`train.lora`, with LoftQ's start as an option). `train.data` turns JSONL (prompt /
completion, or chat messages) into completion-only labels; `train.loop` runs AdamW with warmup
and cosine, accumulation, clipping, gradient checkpointing (`train.forward`), held-out loss,
exact resume and torchrun data parallelism; `train.files` writes the PEFT adapter, the state and
the loss curve. `quadapt train` is `train.command`.

The output is a PEFT adapter directory that `PeftModel.from_pretrained`, `quadapt generate
--adapter` and the serving engine load unchanged. This package imports `runtime` and `kernels`
only (`train.command` also imports `converters`, to quantize a float base in memory). It does
not merge adapters into the base (`quadapt merge-adapter`) or serve them.
"""
