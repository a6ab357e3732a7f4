"""The torch-free text core: tokenizer, chat template, text stream and sampling parameters."""
