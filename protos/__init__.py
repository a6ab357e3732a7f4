"""Reserved for the gRPC protocol: planned, not written yet.

There are no `.proto` files, generated stubs or server today. The plan (DESIGN.md) is
`quadapt/v1/generation.proto` (Generate, GenerateStream, Tokenize, adapter management, ServerInfo)
with its generated stubs here, imported by the server module alone. This package imports nothing
of quadapt.
"""
