"""quadapt's gRPC protocol: `quadapt/v1/generation.proto` and the Python stubs generated from it.

The `.proto` is the contract; the stubs beside it (`generation_pb2.py`, `generation_pb2.pyi`,
`generation_pb2_grpc.py`) are generated, checked in, and imported by `quadapt.runtime.serving.server`
and `quadapt.runtime.serving.client` alone: protobuf types never travel further into quadapt.
Regenerate them after editing the `.proto` with `python -m quadapt.protos.generate`
(needs grpcio-tools, in the `dev` extra); a test checks that they are current. This package
imports nothing of quadapt.
"""
