"""KV-cache inference for the unified model (docs/upstream-compat.md#inference): context ops, text generation, the CFG flow
sampler, the interleaved session and the user API (`VQAInferencer`, `ImageGenerator`)."""
from .api import GenerationResult, ImageGenerator, VQAInferencer, open_image
from .image_sampler import SamplerParams, guide_velocity
from .kv_cache import Context
from .loading import InferenceError

__all__ = ["VQAInferencer", "ImageGenerator", "GenerationResult", "open_image", "SamplerParams", "guide_velocity",
           "Context", "InferenceError"]
