"""Where and how the numbers are computed: the device, mixed precision, torch.compile, and the
process group of a torchrun launch. The same commands run on a CPU, one GPU or several."""

import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def devices_found() -> str:
    """The devices this machine has, as device names: cpu, cuda:0 ..., mps."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return ", ".join(found + (["mps"] if torch.backends.mps.is_available() else []))


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto` is CUDA when available, else the CPU; an explicit device must exist (cuda:N, or mps:
    an Apple GPU). Under torchrun each process takes the GPU of its LOCAL_RANK, so a GPU index
    there is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}={name} is not a device this tool runs on: use auto, cpu, cuda, cuda:N or mps")
    missing = {"cuda": not torch.cuda.is_available(), "mps": not torch.backends.mps.is_available()}
    if missing.get(device.type):
        what = "CUDA GPU" if device.type == "cuda" else "Apple GPU (MPS)"
        raise UserError(f"{key}={name} but this machine has no usable {what}; it has: {devices_found()}. "
                        f"Use {key}=auto or one of those")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{key}={name} but this machine's devices are: {devices_found()}. "
                        f"Use one of those, or {key}=auto")
    if device.type == "cuda" and device.index is not None and world_size() > 1:
        raise UserError(f"{key}={name} under torchrun would put every process on GPU {device.index}: "
                        f"use {key}=cuda (or auto), and each process takes the GPU of its LOCAL_RANK")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    return device


def use_fast_math(device: torch.device) -> None:
    """On a GPU: TF32 tensor cores for float32 matmuls and convolutions (10 mantissa bits, about
    the precision bf16 autocast already accepts; several times the fp32 throughput on Ampere and
    later), and cuDNN's autotuner, which pays off because every step has the same shapes. The CPU
    keeps exact float32 math, which the bit-identical resume tests rely on."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, precision: str):
    """Mixed precision for the model's forward pass: fp32 (off), bf16 or fp16."""
    if PRECISIONS[precision] is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


@contextmanager
def eval_mode(model: nn.Module):
    """Evaluate in eval mode, then give the model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def convolutional(model: nn.Module) -> bool:
    """Convolutional models run faster with NHWC (channels-last) tensors, on CPU and GPU."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_channels_last(model: nn.Module) -> nn.Module:
    if convolutional(model):
        model.to(memory_format=torch.channels_last)
    return model


def compiled(model: nn.Module, enabled: bool, warm_up: Callable[[nn.Module], object], key: str
             ) -> nn.Module:
    """torch.compile(model) when enabled, compiled at once by `warm_up(network)`, which must make
    the calls the real work makes (shapes, grad mode, autocast), so that the work itself never
    recompiles. Where compiling can't work here (no C compiler, an unsupported Python or
    platform) a one-line warning, and the model runs uncompiled. The weights stay shared."""
    if not enabled:
        return model
    network = torch.compile(model)
    try:
        gpus = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=gpus):  # its draws (dropout) leave no trace
            warm_up(network)
    except Exception as error:  # Dynamo/Inductor raise many kinds; any of them means "can't"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning(f"{key}=true: torch.compile does not work here ({reason[:200]}); running "
                    f"without it. Set {key}=false to skip this attempt")
        return model
    return network


# torchrun sets these for every process it starts.
def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> None:
    """Join torchrun's process group (gloo for CPU tensors, NCCL for CUDA ones): once, and only
    when started by torchrun with more than one process."""
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (a dataset download, a cache write), the other ranks after it,
    so that they find its files. Rank 0 releases them even when it fails: they then fail the same
    way, instead of waiting forever."""
    if not dist.is_initialized():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


def broadcast(value):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """`tensor` reduced in place over all ranks with op "sum" or "max"."""
    if dist.is_initialized():
        dist.all_reduce(tensor, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor
