#!/usr/bin/env bash
# Regenerates the Python modules for the KServe v2 / Triton protocol from the .proto files vendored
# from triton-inference-server/common (protobuf/grpc_service.proto, protobuf/model_config.proto;
# BSD-3-Clause, see tokenmill/server/kserve/protos/LICENSE). The generated code is committed, so
# installing tokenmill needs no protoc; rerun this after changing the .proto files.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
    tokenmill/server/kserve/protos/model_config.proto tokenmill/server/kserve/protos/grpc_service.proto
