"""Training with the transformers Trainer: the auxiliary-loss-free bias update, the MTP weight schedule, and logs of
the loss parts and the expert load.

    from modeling_deepseek_v3.training import DeepseekV3Trainer
    trainer = DeepseekV3Trainer(model=model, args=training_args, train_dataset=dataset)  # Trainer's arguments
    trainer.train()

`DeepseekV3Trainer` is `transformers.Trainer` plus:
- `ExpertBiasUpdateCallback`: after every optimizer step, `model.update_expert_bias()` (paper section 2.1.2; counts
  summed over the step's micro-batches and data-parallel ranks); the step's load statistics are logged.
- the loss parts `lm_loss`, `mtp_loss`, `aux_loss` averaged over the logging interval, beside `loss`, so every
  reporter (TensorBoard, W&B, the console) sees them;
- `mtp_loss_weight_schedule`: [(from_step, lambda), ...], e.g. [(0, 0.3), (N, 0.1)] as in the paper.

A plain PyTorch loop calls `model.update_expert_bias()` after each `optimizer.step()` itself.
"""

from pathlib import Path

from transformers import Trainer, TrainerCallback

from .official_checkpoint import CheckpointReader

LOSS_PARTS = ("lm_loss", "mtp_loss", "aux_loss")
LOGGED_LOAD_KEYS = ("max_over_mean_load", "max_over_mean_load_worst", "bias_norm")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class ExpertBiasUpdateCallback(TrainerCallback):
    """Applies `update_expert_bias()` after every optimizer step and keeps the step's load statistics
    (`latest_statistics`, and their mean since the last log in `pending_statistics()`)."""

    def __init__(self):
        self.latest_statistics = {}
        self._sums, self._count = {}, 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        stats = _unwrap(model).update_expert_bias()
        self.latest_statistics = stats
        for key in LOGGED_LOAD_KEYS:
            value = stats.get(key)
            if value is not None and value == value:  # skip NaN (no token counted)
                self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def pending_statistics(self) -> dict:
        """Mean of the logged statistics over the steps since the previous call (then reset)."""
        if not self._count:
            return {}
        means = {f"expert_load/{key}": value / self._count for key, value in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


class MTPLossWeightSchedule(TrainerCallback):
    """Sets `config.mtp_loss_weight` from a step schedule [(from_step, weight), ...] before every step."""

    def __init__(self, schedule):
        self.schedule = sorted((int(step), float(weight)) for step, weight in schedule)
        if not self.schedule or self.schedule[0][0] != 0:
            raise ValueError(f"mtp_loss_weight_schedule: expected a list starting at step 0, found {schedule!r}")

    def weight_at(self, step: int) -> float:
        return [weight for start, weight in self.schedule if start <= step][-1]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        _unwrap(model).config.mtp_loss_weight = self.weight_at(state.global_step)


class DeepseekV3Trainer(Trainer):
    """`transformers.Trainer` for DeepSeek-V3: bias update after each optimizer step, loss parts and expert-load
    statistics in the logs, optional MTP weight schedule. Takes Trainer's arguments plus
    `mtp_loss_weight_schedule` (list of (from_step, lambda))."""

    def __init__(self, *args, mtp_loss_weight_schedule=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_callback = ExpertBiasUpdateCallback()
        self.add_callback(self.bias_callback)
        if mtp_loss_weight_schedule is not None:
            self.add_callback(MTPLossWeightSchedule(mtp_loss_weight_schedule))
        self._part_sums, self._parts_per_item, self._last_logged_step = {}, True, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in LOSS_PARTS:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    # Kept on the device: no host sync per micro-batch.
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + value.detach().float()
            # With the step's token count the micro-batch parts add up to the step's value; without it each is
            # a mean, and the step's value is their average.
            self._parts_per_item = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume from a checkpoint folder written by `save_pretrained` (official layout). transformers' version
        parses its config.json with the base config class, which fails on YaRN `rope_scaling`; the weights load
        through the model's `load_state_dict` hooks for the per-expert keys, strictly."""
        target = _unwrap(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        if not hasattr(target, "update_expert_bias") or self.is_fsdp_enabled or not list(folder.glob("*.safetensors")):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        reader = CheckpointReader(folder)
        state_dict = {key: reader.get(key) for key in reader.weight_map}
        reader.close()
        target.load_state_dict(state_dict, strict=True)

    def log(self, logs: dict, *args, **kwargs):
        steps = self.state.global_step - self._last_logged_step
        if "loss" in logs and self._part_sums and steps > 0:
            denominator = steps * (1 if self._parts_per_item else self.args.gradient_accumulation_steps)
            for name, total in self._part_sums.items():
                logs[name] = round(float(total) / denominator, 6)
            self._part_sums, self._last_logged_step = {}, self.state.global_step
            logs.update({k: round(v, 6) for k, v in self.bias_callback.pending_statistics().items()})
        return super().log(logs, *args, **kwargs)


def set_activation_checkpointing(model, enabled: bool, **kwargs) -> None:
    """Turn gradient (activation) checkpointing of `model`'s layers on or off; `kwargs` go to the enable call
    (e.g. `gradient_checkpointing_kwargs={"use_reentrant": False}`). transformers 5.23 renamed the methods to
    `activation_checkpointing_enable/disable` (the old names warn); earlier 5.x versions have only the old ones."""
    if enabled:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(**kwargs)
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def training_flops_per_token(config, seq_len: int, include_mtp: bool = True) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), for MFU.

    Matrix multiplies count 6 FLOPs per weight a token uses: attention projections, dense MLPs, shared experts, the
    `num_experts_per_tok` routed experts and the router of each MoE layer, the LM head; with `include_mtp`, each MTP
    module (its `eh_proj`, one decoder layer and the shared LM head). Causal attention adds
    `3 * 2 * heads * (qk_head_dim + v_head_dim) * seq_len / 2` per layer (scores and values over the mean causal
    context). Norms, RoPE, softmax and the embedding lookup are not counted (as in the PaLM MFU convention).
    """
    D, H = config.hidden_size, config.num_attention_heads
    q = (D * config.q_lora_rank + config.q_lora_rank * H * config.qk_head_dim if config.q_lora_rank
         else D * H * config.qk_head_dim)
    attention = (q + D * (config.kv_lora_rank + config.qk_rope_head_dim)
                 + config.kv_lora_rank * H * (config.qk_nope_head_dim + config.v_head_dim) + H * config.v_head_dim * D)
    dense_mlp = 3 * D * config.intermediate_size
    moe_mlp = (3 * D * config.moe_intermediate_size * (config.num_experts_per_tok + (config.n_shared_experts or 0))
               + D * config.n_routed_experts)

    def layer_weights(index: int) -> int:
        return attention + (moe_mlp if config.is_moe_layer(index) else dense_mlp)

    head = D * config.vocab_size
    weights = sum(layer_weights(i) for i in range(config.num_hidden_layers)) + head
    layers = config.num_hidden_layers
    if include_mtp:
        for k in range(config.num_nextn_predict_layers):
            weights += 2 * D * D + layer_weights(config.num_hidden_layers + k) + head
        layers += config.num_nextn_predict_layers
    attention_scores = 3 * 2 * H * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
    return 6 * weights + layers * attention_scores


# Dense bf16 tensor-core peak (no sparsity) of the GPUs the benchmarks name, in FLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (`torch.cuda.get_device_name()`), or None when unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


__all__ = ["DeepseekV3Trainer", "ExpertBiasUpdateCallback", "MTPLossWeightSchedule", "peak_bf16_flops",
           "set_activation_checkpointing", "training_flops_per_token"]
