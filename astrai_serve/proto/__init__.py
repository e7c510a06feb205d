"""Generated gRPC stubs of protos/astrai/v1/generate.proto (`make proto` regenerates them; do not edit)."""
from astrai_serve.proto import generate_pb2, generate_pb2_grpc

__all__ = ["generate_pb2", "generate_pb2_grpc"]
