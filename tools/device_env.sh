# On the device machine, in a call after the one that ran .device/rest/install.sh
# (the machine still warm): the same environment as .device/rest/env.sh, without
# carrying .device/rest again. MLX's CUDA build uses the CUDA 13 libraries that
# ship with the machine's PyTorch; the installed wheels are in /root/site.
N=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH="$N/cu13/lib:$N/cudnn/lib:$N/nccl/lib:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$PWD:/root/site:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
