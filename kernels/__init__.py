"""Triton kernels, each beside a torch reference of the same name and signature."""
