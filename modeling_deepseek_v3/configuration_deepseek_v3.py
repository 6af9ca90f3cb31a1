"""DeepSeek-V3 configuration.

Reads the official `config.json` of deepseek-ai/DeepSeek-V3 (and R1, V3-0324, V3.1) unchanged, and writes it back
in the same form (`rope_scaling` and `rope_theta` at the top level, `num_nextn_predict_layers`, the official MoE
field names), so that what this package saves also loads in transformers' built-in model, vLLM and SGLang.
"""

import math

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ATTENTION_FORMS = ("auto", "naive", "absorbed")
MOE_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "gather", "triton")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN magnitude correction `0.1 * mscale * ln(scale) + 1` (1.0 when the context is not extended)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class DeepseekV3Config(PretrainedConfig):
    r"""
    Configuration of a DeepSeek-V3 model (arXiv 2412.19437). Field names and defaults follow the official
    `config.json` of the 671B model, so `DeepseekV3Config()` is that model.

    Args:
        vocab_size (`int`, *optional*, defaults to 129280):
            Vocabulary size.
        hidden_size (`int`, *optional*, defaults to 7168):
            Model dimension.
        intermediate_size (`int`, *optional*, defaults to 18432):
            Width of the dense MLP of the first `first_k_dense_replace` layers.
        moe_intermediate_size (`int`, *optional*, defaults to 2048):
            Width of one routed expert (and of one shared expert).
        num_hidden_layers (`int`, *optional*, defaults to 61):
            Number of decoder layers of the main model.
        num_nextn_predict_layers (`int`, *optional*, defaults to 1):
            Number of Multi-Token Prediction modules. They are stored as `model.layers.{num_hidden_layers + k}`.
        num_attention_heads (`int`, *optional*, defaults to 128):
            Attention heads.
        num_key_value_heads (`int`, *optional*, defaults to 128):
            Must equal `num_attention_heads`: MLA has per-head keys and values decompressed from one latent.
        n_shared_experts (`int`, *optional*, defaults to 1):
            Shared experts per MoE layer (one MLP of width `n_shared_experts * moe_intermediate_size`).
        n_routed_experts (`int`, *optional*, defaults to 256):
            Routed experts per MoE layer.
        ep_size (`int`, *optional*, defaults to 1):
            Expert-parallel size of the official release; kept for round trips, unused here.
        routed_scaling_factor (`float`, *optional*, defaults to 2.5):
            Factor applied to the normalized routing weights.
        kv_lora_rank (`int`, *optional*, defaults to 512):
            Rank of the compressed key/value latent `c_kv` (what the cache stores).
        q_lora_rank (`int`, *optional*, defaults to 1536):
            Rank of the compressed query; `None` gives a plain `q_proj` (DeepSeek-V2-Lite style).
        qk_rope_head_dim (`int`, *optional*, defaults to 64):
            Per-head dimension of the decoupled RoPE part of queries and of the shared RoPE key `k_pe`.
        v_head_dim (`int`, *optional*, defaults to 128):
            Per-head value dimension.
        qk_nope_head_dim (`int`, *optional*, defaults to 128):
            Per-head dimension of the non-rotated part of queries and keys.
        topk_method (`str`, *optional*, defaults to `"noaux_tc"`):
            `"noaux_tc"` (V3: group score = sum of the top-2 biased scores, `e_score_correction_bias` selects),
            `"group_limited_greedy"` (V2: group score = max score) or `"greedy"` (no groups).
        n_group (`int`, *optional*, defaults to 8):
            Expert groups for group-limited routing.
        topk_group (`int`, *optional*, defaults to 4):
            Groups kept per token.
        num_experts_per_tok (`int`, *optional*, defaults to 8):
            Routed experts per token (top-k).
        moe_layer_freq (`int`, *optional*, defaults to 1):
            Every `moe_layer_freq`-th layer after `first_k_dense_replace` is a MoE layer.
        first_k_dense_replace (`int`, *optional*, defaults to 3):
            Number of leading dense layers.
        norm_topk_prob (`bool`, *optional*, defaults to `True`):
            Divide the chosen experts' scores by their sum.
        scoring_func (`str`, *optional*, defaults to `"sigmoid"`):
            `"sigmoid"` (V3) or `"softmax"` (V2).
        aux_loss_alpha (`float`, *optional*, defaults to 0.001):
            Weight alpha of the complementary sequence-wise balance loss (0 turns it off). The official
            `config.json` says 0.001; the paper trained with 1e-4.
        seq_aux (`bool`, *optional*, defaults to `True`):
            Balance loss per sequence (paper) rather than over the whole batch.
        mtp_loss_weight (`float`, *optional*, defaults to 0.1):
            Weight lambda of the MTP loss `lambda / D * sum_k CE_k`. The paper uses 0.3 for the first 10T tokens
            and 0.1 afterwards (the released model ended at 0.1). 0 skips the MTP modules in the forward.
        bias_update_speed (`float`, *optional*, defaults to 0.001):
            Rate gamma of the auxiliary-loss-free bias update `b_i += gamma * sign(mean_load - load_i)`.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the gated MLPs.
        max_position_embeddings (`int`, *optional*, defaults to 163840):
            Longest supported context.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initializer.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            RMSNorm epsilon.
        use_cache (`bool`, *optional*, defaults to `True`):
            Return the latent cache.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            RoPE base.
        rope_scaling (`dict`, *optional*):
            YaRN parameters as in the official config: `{"type": "yarn", "factor", "original_max_position_embeddings",
            "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}`. `None` is plain RoPE.
        attention_bias (`bool`, *optional*, defaults to `False`):
            Bias in the attention projections.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        attention_form (`str`, *optional*, defaults to `"auto"`):
            How MLA attends. `"naive"` decompresses keys/values of every cached token with `kv_b_proj`;
            `"absorbed"` folds `kv_b_proj` into the query and output and attends on the latent cache directly;
            `"auto"` uses naive without a past (prefill) and absorbed as soon as the cache holds tokens (decode).
        moe_implementation (`str`, *optional*, defaults to `"auto"`):
            Routed-expert compute. `"eager"` loops over experts (the reference), `"grouped_mm"` runs one grouped
            GEMM per projection (`torch.nn.functional.grouped_mm`), `"gather"` gathers each (token, expert) pair's
            weights and runs batched matrix-vector products (reads only the chosen experts: decode-sized batches),
            `"triton"` does the same with Triton kernels that index the experts in place (CUDA, SiLU), `"auto"`
            picks triton (or gather without CUDA/triton) when tokens * top-k <= n_routed_experts, else grouped_mm
            on CUDA bf16, else eager.
        cuda_graph_decode (`bool`, *optional*, defaults to `True`):
            Serve decode steps on a static cache (`generate(..., cache_implementation="static")`) on CUDA by replaying
            a captured CUDA graph of the step (captured once per cache and batch size). `False` runs every step
            eagerly (the reference).
        decode_kernels (`bool`, *optional*, defaults to `True`):
            In CUDA inference (eval mode, no autograd), run the small per-token stages through the Triton kernels of
            `decode_kernels.py`: RMSNorm, interleaved RoPE, the `noaux_tc` router, the absorbed attention of one new
            token over the latent cache, and for a few tokens the matrix-vector products of the attention
            projections (`q_a_proj` and `kv_a_proj_with_mqa` in one pass) and of the dense and shared-expert MLPs
            (gate, up and SiLU in one pass). At any size (a prompt's prefill) the SiLU-gated activation and the
            combine of the grouped experts' outputs run as one kernel each. Only plain bias-free `nn.Linear` weights
            take the kernels (a PEFT adapter or a quantized linear runs its own forward). `False` runs the eager
            reference everywhere.
        training_kernels (`bool`, *optional*, defaults to `True`):
            With autograd on CUDA (not under `torch.compile`, which fuses the eager ops itself), run RMSNorm, the
            interleaved RoPE of q_pe and k_pe, the SiLU-gated activation (`silu(gate) * up` of the MLPs and the
            grouped experts) and the combine of the grouped experts' outputs as Triton kernels with their own
            backward (`training_kernels.py`, `moe_kernels.py`): fewer kernels, and no float32 copy of each norm's
            input, of the weighted expert rows nor `silu(gate)` kept for backward. `False` runs the eager reference
            (same math; GPU tests hold the two equal).
    """

    model_type = "deepseek_v3"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_local_experts": "n_routed_experts"}

    def __init__(
        self,
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_nextn_predict_layers=1,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        ep_size=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        moe_layer_freq=1,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        aux_loss_alpha=0.001,
        seq_aux=True,
        mtp_loss_weight=0.1,
        bias_update_speed=0.001,
        hidden_act="silu",
        max_position_embeddings=163840,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        attention_form="auto",
        moe_implementation="auto",
        cuda_graph_decode=True,
        decode_kernels=True,
        training_kernels=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.mtp_loss_weight = mtp_loss_weight
        self.bias_update_speed = bias_update_speed
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        # transformers 5 keeps RoPE settings in `rope_parameters` (`rope_scaling` is a deprecated alias of it) and
        # standardizes them in `super().__init__`; `to_dict` writes them back in the official form. A config saved
        # by transformers' built-in model carries `rope_parameters` instead of `rope_scaling`: accept both.
        rope_parameters = dict(rope_scaling or kwargs.pop("rope_parameters", None) or {})
        self.rope_theta = rope_parameters.get("rope_theta", rope_theta)
        self.rope_parameters = rope_parameters or None
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.attention_form = attention_form
        self.moe_implementation = moe_implementation
        self.cuda_graph_decode = cuda_graph_decode
        self.decode_kernels = decode_kernels
        self.training_kernels = training_kernels
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_deepseek_fields()

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key dimension of the naive form: `qk_nope_head_dim + qk_rope_head_dim`."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_parameters(self) -> dict | None:
        """The YaRN settings (`factor`, `original_max_position_embeddings`, `beta_fast`, ...) or `None`."""
        params = getattr(self, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        return params if rope_type == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """`qk_head_dim ** -0.5`, times `mscale(factor, mscale_all_dim) ** 2` when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn_parameters
        if yarn is not None and yarn.get("mscale_all_dim"):
            mscale = yarn_get_mscale(yarn["factor"], yarn["mscale_all_dim"])
            scale = scale * mscale * mscale
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (MTP layers included) uses DeepSeekMoE instead of a dense MLP (official rule)."""
        if self.n_routed_experts is None or layer_idx < self.first_k_dense_replace:
            return False
        return layer_idx % self.moe_layer_freq == 0

    def _validate_deepseek_fields(self):
        def fail(field, expected, found):
            raise ValueError(f"DeepseekV3Config.{field}: expected {expected}, found {found!r}")

        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", f"num_attention_heads ({self.num_attention_heads}) for MLA", self.num_key_value_heads)
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", "a positive int or None", self.q_lora_rank)
        if self.qk_rope_head_dim % 2 != 0:
            fail("qk_rope_head_dim", "an even number (RoPE rotates pairs)", self.qk_rope_head_dim)
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"one of {SCORING_FUNCS}", self.scoring_func)
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"one of {TOPK_METHODS}", self.topk_method)
        if self.attention_form not in ATTENTION_FORMS:
            fail("attention_form", f"one of {ATTENTION_FORMS}", self.attention_form)
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            fail("moe_implementation", f"one of {MOE_IMPLEMENTATIONS}", self.moe_implementation)
        if self.hidden_act not in ACT2FN:
            fail("hidden_act", "an activation known to transformers.activations.ACT2FN", self.hidden_act)
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "an int >= 0", self.num_nextn_predict_layers)
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"an int in [0, num_hidden_layers={self.num_hidden_layers}]", self.first_k_dense_replace)
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", "an int >= 1", self.moe_layer_freq)
        if self.n_routed_experts is not None:
            n_group = self.n_group or 1
            topk_group = self.topk_group or n_group
            if self.n_routed_experts % n_group != 0:
                fail("n_routed_experts", f"a multiple of n_group ({n_group})", self.n_routed_experts)
            if not 1 <= topk_group <= n_group:
                fail("topk_group", f"an int in [1, n_group={n_group}]", topk_group)
            experts_per_group = self.n_routed_experts // n_group
            if not 1 <= self.num_experts_per_tok <= topk_group * experts_per_group:
                fail(
                    "num_experts_per_tok",
                    f"an int in [1, topk_group * experts per group = {topk_group} * {experts_per_group}]",
                    self.num_experts_per_tok,
                )
            if self.topk_method == "noaux_tc" and n_group > 1 and experts_per_group < 2:
                fail("n_group", "at most n_routed_experts / 2 (noaux_tc scores a group by its top-2 experts)", n_group)
        rope_type = (getattr(self, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in ("default", "yarn"):
            fail("rope_scaling", "None or a dict with type 'yarn'", self.rope_scaling)
        yarn = self.yarn_parameters
        if yarn is not None:
            for key in ("factor", "original_max_position_embeddings"):
                if key not in yarn:
                    fail("rope_scaling", f"a '{key}' entry for YaRN", yarn)

    def to_dict(self):
        """Serialize in the official layout: `rope_scaling` + top-level `rope_theta`, no `rope_parameters`."""
        output = super().to_dict()
        rope_parameters = dict(output.pop("rope_parameters", None) or {})
        output["rope_theta"] = rope_parameters.pop("rope_theta", self.rope_theta)
        rope_type = rope_parameters.pop("rope_type", "default")
        if rope_type == "default":
            output["rope_scaling"] = None
        else:
            rope_parameters.setdefault("type", rope_type)
            output["rope_scaling"] = rope_parameters
        return output


__all__ = ["DeepseekV3Config", "yarn_get_mscale"]
