# batchfarm image: one image for every role (worker, flower, ui, make-model); the command picks it.
# On a GPU host, pip's torch wheel for Linux brings its own CUDA runtime: the host needs only the
# NVIDIA driver and the NVIDIA container toolkit (for the compose file's device reservations).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONPATH=/app PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# g++ builds the worker's CPU decode-attention kernel on the host it runs on (first start, ~15 s;
# worker/decode_attention.py); without it the worker keeps torch's SDPA.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

COPY requirements.txt .
RUN pip install -r requirements.txt && pip install --no-deps $(sed -n 's/^# no-deps: //p' requirements.txt)

COPY protocol protocol
COPY worker worker
COPY producer producer
COPY ops ops
COPY ui ui
COPY api api
COPY farm pyproject.toml ./

# Never run the farm as root; the models volume is created owned by the farm user.
RUN useradd --create-home --uid 1000 farm && mkdir -p /models /home/farm/.cache/huggingface /app/.farm/build \
    && chown -R farm:farm /models /home/farm/.cache /app/.farm
USER farm

ENTRYPOINT ["python", "-m", "ops.cli"]
CMD ["--help"]
