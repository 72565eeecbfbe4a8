# Worker, API and Flower image for NVIDIA GPU hosts (CUDA torch comes with vLLM).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY omni_tasks ./omni_tasks
COPY workers ./workers
COPY config ./config
RUN pip install --no-cache-dir ".[vllm,diffusion,dashboard,api]"
CMD ["celery", "-A", "omni_tasks", "worker", "-Q", "ar"]
