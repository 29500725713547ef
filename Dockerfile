# The nanocp image: one image for `nanocp router` and `nanocp worker` (the Helm chart runs both from it).
# CUDA runtime base for GPU workers; the router and CPU workers run from it unchanged.
#   docker build -t REGISTRY/nanocp:0.1.0 .
FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/nanocp
# Dependencies first, so code changes reuse this layer: PyPI's Linux torch wheel is the CUDA build.
COPY pyproject.toml README.md ./
RUN mkdir -p nanocp && touch nanocp/__init__.py && pip install '.[gpu]' grpcio-tools==1.85.1 && pip uninstall -y nanocp

COPY proto proto
# The package and its package data (nanocp/sim/data: the simulator's calibrations and trace head).
COPY nanocp nanocp
# The gRPC code is generated here, as `make proto` does, never copied from a checkout.
RUN python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. $(find proto -name '*.proto') \
    && touch nanocp/v1/__init__.py nanocp/internal/__init__.py nanocp/internal/v1/__init__.py \
    && pip install --no-deps '.[gpu]' \
    && pip uninstall -y grpcio-tools

# Kubernetes checks health with its own probes (grpc.health.v1 on the serving port): no Docker HEALTHCHECK.
# checkov:skip=CKV_DOCKER_2:Kubernetes probes check health; a HEALTHCHECK is ignored there
# A non-root user (the chart runs the pods as its uid, 10001); FlashInfer's JIT cache goes to its home.
RUN useradd --create-home --uid 10001 nanocp
USER nanocp
ENV HOME=/home/nanocp
EXPOSE 50051 8000 50061 29500
ENTRYPOINT ["nanocp"]
CMD ["--help"]
