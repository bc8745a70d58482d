"""greeter: a gRPC server with one unary method, /greet.Greeter/Hello. Messages are raw
UTF-8 bytes (no protobuf code generation needed); the answer names the replica."""

from __future__ import annotations

import os
from concurrent import futures

import grpc

REPLICA = os.environ.get("REPLICA", "0")


def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    ids = [v for k, v in context.invocation_metadata() if k == "meshlet-client-id"]
    caller = ids[0] if ids else "unauthenticated"
    return f"hello {request.decode()} from greeter-{REPLICA} (caller: {caller})".encode()


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "greet.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})
    server.add_generic_rpc_handlers((handler,))
    port = os.environ["PORT"]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"greeter-{REPLICA}: serving gRPC on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
