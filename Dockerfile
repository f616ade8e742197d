# gsa serve in a container: the CPU build of torch, a non-root user, a health check.
#   docker build -t gsa-serve .
#   docker run --rm -p 8000:8000 -e GSA_API_KEY=change-me -v "$PWD/my-model:/models/my-model:ro" gsa-serve /models/my-model
# With no MODEL argument the embedded default model is served (trained on first start, about 3 minutes, unless
# the image was built with --build-arg PRETRAIN_DEFAULT=1). The container binds 0.0.0.0, so GSA_API_KEY is
# required: without it gsa serve refuses to start (exit status 2) rather than serve unauthenticated.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# The CPU build of torch first, from PyTorch's CPU index: the project's torch range is then satisfied and
# pip never pulls a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gsa_core ./gsa_core
COPY gsa_plugins ./gsa_plugins
COPY integrations ./integrations
RUN pip install . && rm -rf /app/build

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin gsa
USER gsa
ENV GSA_HOME=/home/gsa/.gsa

ARG PRETRAIN_DEFAULT=0
RUN if [ "$PRETRAIN_DEFAULT" = "1" ]; then \
        python -c "from gsa_chat.models import default_model_path; default_model_path(progress=False)"; \
    fi

EXPOSE 8000
# /health needs no API key; the start period covers training the default model on first start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["gsa", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
