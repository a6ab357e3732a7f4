"""Reserved for QLoRA training: planned, not written yet.

Nothing here trains today. Adapters come from PEFT (`quadapt convert-adapter` checks one against
its base) or from SVD extraction of a fine-tuned checkpoint (`quadapt extract-adapter`). The plan
(DESIGN.md): LoRA trained over the runtime's packed, frozen base through the same dequant kernels,
written out as a PEFT adapter the runtime loads unchanged.
"""
