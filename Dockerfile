# PreMoe Service image: the `premoe` CLI with the gRPC server as its default command.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# torch first and alone, from the CPU wheel index, so no dependency pulls the CUDA build.
# For a CUDA image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0

# A C++ compiler: `premoe serve` compiles its decoder stack (torch.compile's CPU kernels are generated C++); without
# one it says so and runs eager.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY protos ./protos
COPY premoe_service ./premoe_service
# Every dependency at the version the test suite last passed with (requirements.lock, used as constraints).
RUN pip install -c requirements.lock . "torch==2.13.0"

# The store and the profiles are mounted; see docker-compose.yml. Ports: gRPC, OpenAI-compatible HTTP, metrics.
ENV PREMOE_STORE=/data/store \
    PREMOE_PROFILES=/data/profiles \
    PREMOE_HOST=0.0.0.0 \
    PREMOE_PORT=50051 \
    PREMOE_HTTP_PORT=8000 \
    PREMOE_METRICS_PORT=9100
EXPOSE 50051 8000 9100

# `premoe health` imports grpc and the generated code only (no torch): a check costs a fraction of a second.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD premoe health --server "127.0.0.1:${PREMOE_PORT}" --timeout 3

ENTRYPOINT ["premoe"]
CMD ["serve"]
