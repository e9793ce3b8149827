# megatron-qwen on an NGC PyTorch container, which already carries CUDA, torch, Transformer Engine and apex.
# 25.11: torch 2.10.0a0, CUDA 13.0, Python 3.12 and Transformer Engine 2.9 (NVIDIA's release notes for 25.11),
# inside the range megatron-core 0.16.1 declares (transformer-engine >=2.9,<2.12); 25.04, the default before,
# carried TE 2.2. Another release: --build-arg NGC_PYTORCH=...; the check at the end of the build says whether
# its TE fits. Not built by this project's CI (it has no Docker and no GPU).
ARG NGC_PYTORCH=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${NGC_PYTORCH}

WORKDIR /workspace/megatron-qwen
COPY setup.py README.md ./
COPY megatron_qwen ./megatron_qwen
COPY tools ./tools
COPY examples ./examples

# The container's torch is a pre-release build; setup.py only asks for torch>=2.4, --no-build-isolation keeps pip
# from fetching another to build with, and NGC's pip constraints file (/etc/pip/constraint.txt, in force since 25.03)
# holds every package the container ships at its version. tools/container_check.py then fails the build if torch
# changed anyway or Transformer Engine is outside megatron-core's declared range.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch_before \
 && pip install --no-cache-dir --no-build-isolation -e . \
 && python tools/container_check.py --torch-version "$(cat /tmp/torch_before)"

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
