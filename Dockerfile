# specserve server image. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_VARIANT=cuda -t specserve:cuda .
# and run with `--gpus all ... specserve serve --device cuda`.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# cpu: torch's CPU-only wheel (small); cuda: the default wheel, which bundles its CUDA libraries.
ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC="torch>=2.4,<2.14"
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    SPECSERVE_CACHE=/models

WORKDIR /opt/specserve
# A C++ compiler: specserve builds its CPU attention kernel (kernels/cpu_attention.cpp) with it, below
# for this image's CPU and again at first use on a CPU of another vector ISA.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch at the version of the lock (constraints.txt, the versions CI tested), as a CPU or CUDA build.
COPY constraints.txt ./
# hadolint ignore=DL3013
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install -c constraints.txt --index-url "$TORCH_CPU_INDEX" "$TORCH_SPEC"; \
    else \
        pip install -c constraints.txt "$TORCH_SPEC"; \
    fi

COPY pyproject.toml README.md __init__.py ./
COPY kernels ./kernels
COPY drafting ./drafting
COPY server ./server
# Install, then pull the built-in default model at build time, so the container starts offline.
RUN pip install -c constraints.txt . \
    && specserve models pull tiny-vlm --quiet \
    && python -c "from specserve.kernels import cpu_attention; assert cpu_attention.available()" \
    && useradd --uid 10001 --create-home specserve \
    && chown -R 10001 /models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["specserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
