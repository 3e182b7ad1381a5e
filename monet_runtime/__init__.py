"""The MONET model in plain PyTorch: config, checkpoint loading, expert masks, routing
capture and generation.

    from monet_runtime import load_model, ExpertMask
    model = load_model(path, dtype=torch.float32, device="cpu")
    out = model(input_ids, mask=None, output_router_probs=False)
    mask = ExpertMask.from_json(path_or_dict)
    ids = model.generate(input_ids, max_new_tokens=20, mask=mask, do_sample=False)
"""

import importlib

# Loaded on first use (PEP 562): `import monet_runtime.expert_mask` (what the mask schema, and so
# the server, needs) must not pull torch in through the model.
_EXPORTS = {
    "ConfigError": "monet_runtime.config",
    "MonetConfig": "monet_runtime.config",
    "ExpertMask": "monet_runtime.expert_mask",
    "MaskError": "monet_runtime.expert_mask",
    "Generation": "monet_runtime.generation",
    "GenerationRequest": "monet_runtime.generation",
    "SamplingParams": "monet_runtime.generation",
    "generate_batch": "monet_runtime.generation",
    "stream_generate": "monet_runtime.generation",
    "CheckpointError": "monet_runtime.loading",
    "load_model": "monet_runtime.loading",
    "model_identity": "monet_runtime.loading",
    "save_checkpoint": "monet_runtime.loading",
    "KVCache": "monet_runtime.model",
    "MaskBatch": "monet_runtime.model",
    "MonetForCausalLM": "monet_runtime.model",
    "MonetOutput": "monet_runtime.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'monet_runtime' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
