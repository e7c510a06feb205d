"""The gRPC contract in Python: stubs generated from protos/astrai/v1/generate.proto
(`generate_pb2`, `generate_pb2_grpc`; `make proto` regenerates them, do not edit), the constants
both ends share (`contract`), the checks both ends apply to tools and output constraints
(`constraints`) and the generator (`regenerate`).

Imports nothing eagerly, so `python -m astrai_serve.proto.regenerate` runs even when the committed
stubs do not import (a protobuf runtime too old for them, say).
"""
