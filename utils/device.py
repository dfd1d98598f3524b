"""Device selection: CUDA when available (GPU id from --cuda), else the CPU; never assumed."""
import torch

from .errors import UserError


def select_device(requested="auto", cuda_index=0):
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: this tool runs on the CPU or CUDA only; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested} asks for CUDA but torch.cuda.is_available() is False; "
                            "use --device cpu (or auto)")
        index = cuda_index if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"GPU {index} does not exist (this machine has {torch.cuda.device_count()}); "
                            "pass --cuda with a valid GPU id")
        device = torch.device("cuda", index)
    return device
