"""The names by which the vLLM engine and the vLLM worker side refer to per-request mask state.

monet_runtime.vllm_engine (which imports vLLM only when it starts one) writes them;
monet_runtime.vllm_profiles and monet_runtime.vllm_model (which import vLLM) read them. Defined
once here, in a module that imports neither vLLM nor torch.
"""

__all__ = ["CAPTURE_KEY", "DEFAULT_MASK_SLOTS", "MASK_KEY", "MASK_SLOTS_KEY", "SPARSE_KEY"]

MASK_KEY = "monet_mask"  # SamplingParams.extra_args: "name@version" of an installed profile
CAPTURE_KEY = "monet_capture"  # extra_args: the key under which to keep the request's routing
MASK_SLOTS_KEY = "monet_mask_slots"  # hf_overrides: P, the mask slots on each worker's device
DEFAULT_MASK_SLOTS = 8
SPARSE_KEY = "monet_sparse_experts"  # hf_overrides: False keeps the expert layers dense
