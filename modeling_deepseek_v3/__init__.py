"""DeepSeek-V3 for Hugging Face transformers.

Importing the package registers its classes with the transformers Auto API for `model_type="deepseek_v3"`
(replacing transformers' built-in DeepSeek-V3 for `AutoConfig`/`AutoModel`/`AutoModelForCausalLM` in this
process; `transformers.DeepseekV3ForCausalLM` itself stays the built-in). Saved models carry `auto_map` and the
modeling files, so `trust_remote_code=True` loads them where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_deepseek_v3 import DeepseekV3Config
from .modeling_deepseek_v3 import (
    DeepseekV3CausalLMOutputWithPast,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3ModelOutputWithPast,
    DeepseekV3PreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(DeepseekV3Config.model_type, DeepseekV3Config, exist_ok=True)
AutoModel.register(DeepseekV3Config, DeepseekV3Model, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV3Config, DeepseekV3ForCausalLM, exist_ok=True)
DeepseekV3Config.register_for_auto_class()
DeepseekV3Model.register_for_auto_class("AutoModel")
DeepseekV3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DeepseekV3CausalLMOutputWithPast",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3ModelOutputWithPast",
    "DeepseekV3PreTrainedModel",
]
