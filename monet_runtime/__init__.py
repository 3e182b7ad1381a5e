"""The MONET model in plain PyTorch: config, checkpoint loading, expert masks, routing
capture and generation.

    from monet_runtime import load_model, ExpertMask
    model = load_model(path, dtype=torch.float32, device="cpu")
    out = model(input_ids, mask=None, output_router_probs=False)
    mask = ExpertMask.from_json(path_or_dict)
    ids = model.generate(input_ids, max_new_tokens=20, mask=mask, do_sample=False)
"""

from monet_runtime.config import ConfigError, MonetConfig
from monet_runtime.expert_mask import ExpertMask, MaskError
from monet_runtime.generation import (
    Generation,
    GenerationRequest,
    SamplingParams,
    generate_batch,
    stream_generate,
)
from monet_runtime.loading import CheckpointError, load_model, model_identity, save_checkpoint
from monet_runtime.model import KVCache, MaskBatch, MonetForCausalLM, MonetOutput

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExpertMask",
    "Generation",
    "GenerationRequest",
    "KVCache",
    "MaskBatch",
    "MaskError",
    "MonetConfig",
    "MonetForCausalLM",
    "MonetOutput",
    "SamplingParams",
    "generate_batch",
    "load_model",
    "model_identity",
    "save_checkpoint",
    "stream_generate",
]
