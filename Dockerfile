# Minerva on NVIDIA GPUs. Build:  docker build -t minerva:cuda .
# Run:    docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro minerva:cuda \
#             /models/gpt-oss-20b --device cuda --config /opt/minerva/configs/gpt-oss-20b.toml
# See docs/deploy.md. The CUDA runtime comes from the base image; torch's CUDA wheel matches it.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages follow the base image's release; pinning their versions would break
# every rebuild after an Ubuntu security update. tini forwards SIGTERM to the server (drain).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/minerva
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY server server
COPY configs configs
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 minerva

USER 10001
ENV HOME=/home/minerva
VOLUME ["/models"]
EXPOSE 8000
# Weight loading can take minutes: failures count only after the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "minerva", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/models/gpt-oss-20b", "--device", "cuda", "--config", "/opt/minerva/configs/gpt-oss-20b.toml"]
