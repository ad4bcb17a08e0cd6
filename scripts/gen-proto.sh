#!/usr/bin/env bash
# Generate Python code (with mypy stubs) for every .proto under proto/ into
# the package tree: proto/sidecar/api/v1/x.proto -> sidecar/api/v1/x_pb2.py.
#   scripts/gen-proto.sh            write into the repository
#   scripts/gen-proto.sh --check    regenerate in a scratch folder and fail on any difference
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"  # protoc-gen-mypy lives beside the interpreter
out=.
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mapfile -t protos < <(find proto -name '*.proto' | sort)
[ ${#protos[@]} -gt 0 ] || exit 0
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" "${protos[@]}"
if [ "$out" != . ]; then
  status=0
  while IFS= read -r f; do
    rel=${f#"$out"/}
    if ! cmp -s "$f" "$rel"; then
      echo "generated code is stale: $rel (run: make proto)" >&2
      status=1
    fi
  done < <(find "$out" -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \))
  exit $status
fi
