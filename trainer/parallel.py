"""Data-parallel wrapping: DDP on CPU (gloo), FSDP2 on CUDA (NCCL) per docs/upstream-compat.md#distribution.

GPU layout: one FSDP unit per decoder layer, ViT encoder layer, ViT, connector, timestep embedder and
position-embedding table (upstream's auto-wrap classes), the VAE as its own unit, everything else (embed_tokens,
lm_head, final norms, vae2llm, llm2vae) in the root unit. bf16 parameters and reductions, fp32 master weights.
HYBRID_SHARD uses a 2-D mesh (replicate, shard); NO_SHARD the same mesh with shards of one rank. FSDP2 keeps per-parameter sharding, so units with mixed
requires_grad (freeze_llm) work, unlike upstream's flat parameters. Activation checkpointing (non-reentrant)
is the model's own switch on decoder and ViT layers.

Also: gathering full state dicts for saving, and optimizer state <-> plain local tensors for shard files.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

FSDP_UNIT_CLASSES = ("Qwen2DecoderLayer", "Qwen2MoEDecoderLayer", "Qwen2MoTDecoderLayer", "SiglipEncoderLayer",
                     "SiglipVisionTransformer", "MLPconnector", "TimestepEmbedder", "PositionEmbedding")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


class StepModule(nn.Module):
    """VAE encode + model forward as one module, so DDP sees every parameter the step uses (a trainable VAE
    included). With a frozen VAE the encode runs under no_grad, as upstream."""

    def __init__(self, model: nn.Module, freeze_vae: bool) -> None:
        super().__init__()
        self.model = model
        self.freeze_vae = freeze_vae

    def forward(self, batch, noise: Optional[torch.Tensor] = None, vae_generator: Optional[torch.Generator] = None):
        latent = None
        vae = getattr(self.model, "vae_model", None)
        if vae is not None and batch.has_vae and getattr(self.model.config, "visual_gen", True):
            if self.freeze_vae:
                with torch.no_grad():
                    latent = vae.encode(batch.padded_images, generator=vae_generator)
            else:
                latent = vae.encode(batch.padded_images, generator=vae_generator)
        return self.model(batch, latent, noise=noise)


@dataclass
class Parallel:
    """What the loop needs to know about the wrapping."""
    step_module: nn.Module          # call this for forward
    model: nn.Module                # the unwrapped model (EMA updates, state dicts, freezing)
    kind: str                       # "single" | "ddp" | "fsdp"
    optimizer_shard: Optional[tuple[int, int]]  # (index, count) this rank writes, or None
    optimizer_load_shard: tuple[int, int]       # the shard file this rank reads on resume
    mesh: Any = None

    def no_sync(self):
        """Skip gradient reduction on non-final micro-steps of an accumulation window."""
        import contextlib

        if self.kind == "ddp":
            return self.step_module.no_sync()
        if self.kind == "fsdp":
            return _fsdp_no_sync(self.step_module)
        return contextlib.nullcontext()


class _fsdp_no_sync:
    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __enter__(self):
        self.root.set_requires_gradient_sync(False)   # FSDP2: accumulate unsharded grads, no reduce-scatter

    def __exit__(self, *exc):
        self.root.set_requires_gradient_sync(True)
        return False


def wrap_ddp(model: nn.Module, freeze_vae: bool) -> Parallel:
    rank, world = rank_and_world()
    step = StepModule(model, freeze_vae)
    if world == 1:
        return Parallel(step, model, "single", (0, 1), (0, 1))
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    # some micro-batches carry no ViT or no VAE tokens: those experts get no gradient on that rank
    # broadcast_buffers=False: our buffers are rank-local. Newer torch calls the flag deprecated in favour of
    # forward_sync_buffers, which still syncs at init (the FutureWarning itself says to keep the old flag for
    # that), so the warning is silenced here, where it arises, and nowhere else
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
        ddp = DDP(step, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False)
    return Parallel(ddp, model, "ddp", (0, 1) if rank == 0 else None, (0, 1))


def _units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in FSDP_UNIT_CLASSES]


def wrap_fsdp(model: nn.Module, *, freeze_vae: bool, sharding_strategy: str, num_replicate: int,
              num_shard: Optional[int], cpu_offload: bool, activation_checkpointing: bool,
              reshard_after_forward: bool = True, device_type: str = "cuda",
              param_dtype: Optional[torch.dtype] = torch.bfloat16) -> Parallel:
    """FSDP2 (`fully_shard`) with bf16 mixed precision; call on the CPU model after freezing: fully_shard
    moves each unit to the mesh's device as it shards it, so the whole model is never on one GPU.
    `device_type="cpu"` (gloo) runs the same wrapping on CPU, where `param_dtype=None` keeps fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    try:
        from torch.distributed.fsdp import register_fsdp_forward_method
    except ImportError:  # older torch
        from torch.distributed._composable.fsdp import register_fsdp_forward_method

    rank, world = rank_and_world()
    if activation_checkpointing and hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
    if sharding_strategy in ("HYBRID_SHARD", "NO_SHARD") and world > 1:
        # NO_SHARD (every rank holds all parameters, gradients all-reduced) is HSDP with shard groups of one
        replicate, shard = ((world, 1) if sharding_strategy == "NO_SHARD"
                            else (num_replicate, num_shard or world // num_replicate))
        mesh = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
        opt_shard = (rank % shard, shard) if rank < shard else None  # replica 0 writes the shards
        load_shard = (rank % shard, shard)
    else:
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
        opt_shard = (rank, world)
        load_shard = (rank, world)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype, output_dtype=None)
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    # innermost first: fully_shard on a child before its parent
    units = _units(model)
    for unit in reversed(units):
        fully_shard(unit, **kw)
    vae = getattr(model, "vae_model", None)
    if vae is not None:
        fully_shard(vae, **kw)
        register_fsdp_forward_method(vae, "encode")  # encode() is not forward()
    # the root unit is the step module (VAE encode + model forward), so FSDP's lazy init runs from the root
    # before the VAE unit is used; the model's own top-level tensors (embed_tokens, lm_head, norms, vae2llm,
    # llm2vae) live in this root unit, as upstream
    step = StepModule(model, freeze_vae)
    fully_shard(step, **kw)
    return Parallel(step, model, "fsdp", opt_shard, load_shard, mesh)


def wrap_ema_fsdp(ema: nn.Module, mesh: Any, cpu_offload: bool = False) -> None:
    """Shard the EMA copy exactly like the model (fp32, no mixed precision), so shards line up one-to-one;
    with `cpu_offload` its shards stay on the CPU next to the model's offloaded shards (the EMA update mixes
    them element-wise)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in reversed(_units(ema)):
        fully_shard(unit, **kw)
    vae = getattr(ema, "vae_model", None)
    if vae is not None:
        fully_shard(vae, **kw)
    fully_shard(ema, **kw)


def full_state_dict(model: nn.Module, kind: str) -> Optional[dict[str, torch.Tensor]]:
    """Full, unsharded CPU state dict on rank 0 (None elsewhere). Collective under FSDP: all ranks call it."""
    rank, _ = rank_and_world()
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if rank == 0 else None
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _to_local(obj: Any) -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore
    if DTensor and isinstance(obj, DTensor):
        return obj.to_local().detach().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def optimizer_state_for_save(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with DTensor shards turned into plain local CPU tensors (one file per shard)."""
    return _to_local(optimizer.state_dict())


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state_for_save`: local shards are re-wrapped as DTensors like their params."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, optimizer.param_groups)):
        raise ValueError("optimizer state does not match the parameter groups (did freezing or the model change?)")
    new_state = {}
    for idx, s in state["state"].items():
        p = params[int(idx)]
        out = {}
        for k, v in s.items():
            if DTensor is not None and isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0:
                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            elif isinstance(v, torch.Tensor) and v.dim() > 0:
                v = v.to(p.device)
            out[k] = v
        new_state[idx] = out
    optimizer.load_state_dict({"state": new_state, "param_groups": saved_groups})


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """FSDP2-aware (DTensor grads reduce across shards inside clip_grad_norm_)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    except ImportError:  # pragma: no cover
        pass
    return norm
