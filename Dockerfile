# megatron-qwen on an NGC PyTorch container, which already carries CUDA, torch, Transformer Engine and apex.
# The container's torch is a pre-release build (e.g. 2.7.0a0+...); setup.py only asks for torch>=2.4, and the
# install below uses --no-build-isolation so pip keeps the container's torch instead of fetching another.
ARG NGC_PYTORCH=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${NGC_PYTORCH}

WORKDIR /workspace/megatron-qwen
COPY setup.py README.md ./
COPY megatron_qwen ./megatron_qwen
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests

# Fail the build if installing would replace the container's torch.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch_before \
 && pip install --no-cache-dir --no-build-isolation -e '.[test]' \
 && python -c "import torch; print(torch.__version__)" | diff - /tmp/torch_before \
 && python -c "import transformer_engine, megatron.core; print('TE and megatron-core import')"

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
