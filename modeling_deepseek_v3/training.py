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

A plain PyTorch loop calls `model.update_expert_bias()` after each `optimizer.step()` itself, and can run its
forward + backward as CUDA graph replays with `GraphedTrainingStep`.
"""

from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .modeling_deepseek_v3 import DeepseekV3CausalLMOutputWithPast, statistics_to_host
from .official_checkpoint import CheckpointReader

logger = logging.get_logger(__name__)

LOSS_PARTS = ("lm_loss", "mtp_loss", "aux_loss")
LOGGED_LOAD_KEYS = ("max_over_mean_load", "max_over_mean_load_worst", "bias_norm")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class ExpertBiasUpdateCallback(TrainerCallback):
    """Applies `update_expert_bias()` after every optimizer step and keeps the step's load statistics
    (`latest_statistics`, and their mean since the last log in `pending_statistics()`). The statistics stay on the
    device until they are read, so a training step has no host sync of its own here."""

    def __init__(self):
        self._latest = {}
        self._sums, self._counts = {}, {}

    @property
    def latest_statistics(self) -> dict:
        """The load statistics of the latest optimizer step, as Python floats."""
        return statistics_to_host(self._latest)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        stats = _unwrap(model).update_expert_bias(as_tensors=True)
        self._latest = stats
        for key in LOGGED_LOAD_KEYS:
            value = stats.get(key)
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float64)
            counted = ~torch.isnan(value)  # NaN: no token counted in that step
            self._sums[key] = self._sums.get(key, 0.0) + torch.where(counted, value, 0.0)
            self._counts[key] = self._counts.get(key, 0.0) + counted.to(torch.float64)

    def pending_statistics(self) -> dict:
        """Mean of the logged statistics over the steps since the previous call that counted tokens (then reset)."""
        sums, counts = statistics_to_host(self._sums), statistics_to_host(self._counts)
        self._sums, self._counts = {}, {}
        return {f"expert_load/{key}": total / counts[key] for key, total in sums.items() if counts[key]}


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
    `mtp_loss_weight_schedule` (list of (from_step, lambda)) and `cuda_graph_step`.

    `cuda_graph_step=True` runs each micro-batch's forward + backward as a `GraphedTrainingStep` replay where that
    is the same computation as Trainer's own step: one process on one GPU, no fp16 loss scaler, no custom loss or
    label smoothing, batches of `input_ids` and `labels` (and an all-ones `attention_mask`) of the first batch's
    shape. Any other micro-batch (a shorter last batch, padding) takes Trainer's eager step; a setup that never
    qualifies is named in a warning once. Off CUDA (or across devices) the same step runs eagerly."""

    def __init__(self, *args, mtp_loss_weight_schedule=None, cuda_graph_step: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_callback = ExpertBiasUpdateCallback()
        self.add_callback(self.bias_callback)
        if mtp_loss_weight_schedule is not None:
            self.add_callback(MTPLossWeightSchedule(mtp_loss_weight_schedule))
        self._part_sums, self._parts_per_item, self._last_logged_step = {}, True, 0
        self.cuda_graph_step = cuda_graph_step
        self._graphed = None  # (GraphedTrainingStep, the input shape it serves)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._add_loss_parts(outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _add_loss_parts(self, outputs, num_items_in_batch) -> None:
        for name in LOSS_PARTS:
            value = outputs.get(name) if hasattr(outputs, "get") else None
            if value is not None:
                # Kept on the device: no host sync per micro-batch.
                self._part_sums[name] = self._part_sums.get(name, 0.0) + value.detach().float()
        # With the step's token count the micro-batch parts add up to the step's value; without it each is a mean,
        # and the step's value is their average.
        self._parts_per_item = num_items_in_batch is not None

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self._graphed_step_for(model, inputs)
        if step is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # Trainer's scaling: a loss summed over the step's token count is already scaled for gradient
        # accumulation; a mean loss is divided by the micro-batch count. accelerate divides by its own count.
        passes_items = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        scaled = passes_items if scaled is None else scaled
        share = 1.0 if scaled else 1.0 / self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            outputs = step(inputs["input_ids"], inputs["labels"], num_items_in_batch if passes_items else None,
                           loss_scale=share / self.accelerator.gradient_accumulation_steps)
        self._add_loss_parts(outputs, num_items_in_batch if passes_items else None)
        return outputs.loss * share

    def _graphed_step_for(self, model, inputs) -> "GraphedTrainingStep | None":
        """The captured step for this micro-batch, or None where Trainer's own step must run."""
        if not self.cuda_graph_step:
            return None
        reasons = {
            "the model is wrapped (distributed or DataParallel)": model is not self.model,
            "more than one process": self.accelerator.distributed_type != DistributedType.NO,
            "DataParallel over several GPUs": self.args.n_gpu > 1,
            "an fp16 loss scaler": self.accelerator.scaler is not None,
            "a custom loss (compute_loss_func or label smoothing)": (
                self.compute_loss_func is not None or self.label_smoother is not None
            ),
            "batches with keys other than input_ids, labels, attention_mask": not (
                "labels" in inputs and set(inputs) <= {"input_ids", "labels", "attention_mask"}
            ),
        }
        blocked = [reason for reason, applies in reasons.items() if applies]
        if blocked:
            if not getattr(self, "_warned_graph", False):
                logger.warning("cuda_graph_step: Trainer's eager step runs instead (%s)", "; ".join(blocked))
                self._warned_graph = True
            return None
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return None  # padding: the graph runs full blocks only
        shape = tuple(inputs["input_ids"].shape)
        if self._graphed is None:
            self._graphed = (GraphedTrainingStep(self.model), shape)
        step, served = self._graphed
        return step if shape == served else None

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


# Eager forward + backward runs before the first capture: lazy initialization (cuBLAS and cuDNN plans, Triton
# compilation and autotuning) must happen outside the graph.
GRAPH_WARMUP_STEPS = 2


class GraphedTrainingStep:
    """Forward + backward of a causal LM on batches of one shape, replayed as CUDA graphs.

    An eager training step launches about 2,000 kernels from Python; on a V3-Lite layer stack the host needs about as
    long to launch them as the GPU needs to run them, so the GPU waits (benchmarks/RESULTS.md). A captured step is
    one launch and runs at the GPU's pace:

        step = GraphedTrainingStep(model)                     # captures at the first call
        for batch in loader:                                  # full blocks of one shape (no padding)
            out = step(batch["input_ids"], batch["labels"])   # out.loss, out.lm_loss, out.mtp_loss, out.aux_loss
            optimizer.step()
            model.update_expert_bias()
            optimizer.zero_grad()

    Gradients land in `p.grad` as in eager training: where they are None (after `zero_grad()`), a call writes them;
    where they are set, it adds to them (gradient accumulation, as a second graph captured when first needed, in the
    first one's memory). The routed-token counts for `update_expert_bias()` add up as in eager training, and the
    bias it updates in place is read by the next replay. The returned losses are copies; logits are not kept.

    Fixed at capture, and captured again when they change: the input shapes, whether `num_items_in_batch` is
    given, `model.training`, autocast, gradient checkpointing, `config.mtp_loss_weight` (the MTP weight schedule
    changes it) and `config.aux_loss_alpha`. Any other change to the model needs a new GraphedTrainingStep.
    `forward` runs in place of `model` (e.g. `torch.compile(model)`). `capture=False` runs each call eagerly (the
    reference); the default captures when every parameter is on one CUDA device.

    Not supported (ValueError): a wrapped model (DistributedDataParallel and FSDP communicate inside backward), capture
    with parameters off CUDA or on several devices. Padding masks are not taken: pack documents into full blocks.
    """

    def __init__(self, model: torch.nn.Module, forward=None, capture: bool | None = None):
        if hasattr(model, "module"):
            raise ValueError(
                f"GraphedTrainingStep: expected the model itself, found a {type(model).__name__} wrapper "
                "(DistributedDataParallel and FSDP communicate inside backward, which a captured graph cannot replay)"
            )
        devices = {p.device for p in model.parameters()}
        on_one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
        if capture and not on_one_gpu:
            raise ValueError(
                "GraphedTrainingStep: capture needs every parameter on one CUDA device, found "
                f"{sorted(map(str, devices))}"
            )
        self.model = model
        self.forward = model if forward is None else forward
        self.capture = on_one_gpu if capture is None else capture
        self.device = next(iter(devices))
        self.captures = 0  # graphs captured so far (the write graph and the accumulate graph count one each)
        self._key = None
        self._reset()

    def _reset(self) -> None:
        self._inputs: dict[str, torch.Tensor] = {}
        self._graphs: dict[bool, tuple[torch.cuda.CUDAGraph, dict]] = {}  # accumulate? -> (graph, static outputs)
        self._params: list[torch.nn.Parameter] = []
        self._grads: list[torch.Tensor] = []  # the write graph's gradient tensors, one per entry of _params

    def _capture_key(self, input_ids, num_items_in_batch) -> tuple:
        model, config = self.model, self.model.config
        device_type = self.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        return (
            tuple(input_ids.shape), input_ids.dtype, num_items_in_batch is not None,
            model.training, autocast, getattr(model, "is_gradient_checkpointing", False),
            getattr(config, "mtp_loss_weight", None), getattr(config, "aux_loss_alpha", None),
        )

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, loss_scale: float = 1.0):
        """input_ids, labels [B, T] (labels shifted inside the model; -100 = ignore); `num_items_in_batch`: the
        token count of the whole optimizer step, as the Trainer passes it (the losses are then sums over it);
        backward runs on `loss * loss_scale` (e.g. 1 / gradient-accumulation steps for mean losses). Returns the
        model's output class with `loss` (unscaled) and its parts (copies), and no logits."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"GraphedTrainingStep: input_ids must be integer [B, T], found {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        if labels.shape != input_ids.shape:
            raise ValueError(f"GraphedTrainingStep: labels has shape {list(labels.shape)}, expected input_ids' shape "
                             f"{list(input_ids.shape)}")
        if not self.capture:
            return self._outputs_of(self._forward_backward(input_ids, labels, num_items_in_batch, loss_scale))
        key = self._capture_key(input_ids, num_items_in_batch)  # labels were checked against input_ids above
        if key != self._key:
            self._reset()
            self._key = key
        self._feed(input_ids, labels, num_items_in_batch, loss_scale)
        if False not in self._graphs:
            self._capture_write()
        accumulate = self._prepare_grads()
        if accumulate not in self._graphs:
            self._capture_graph(accumulate)
        graph, outputs = self._graphs[accumulate]
        graph.replay()
        for param, grad in zip(self._params, self._grads):
            param.grad = grad
        return self._outputs_of(outputs)

    def _forward_backward(self, input_ids, labels, num_items_in_batch, loss_scale) -> dict:
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        output = self.forward(input_ids=input_ids, labels=labels, use_cache=False, **kwargs)
        names = ("loss",) + LOSS_PARTS
        losses = {name: getattr(output, name) for name in names if getattr(output, name, None) is not None}
        del output  # the logits (1 GB at 4k tokens of a 129k vocabulary) are not kept through backward
        (losses["loss"] * loss_scale).backward()
        return losses

    def _outputs_of(self, outputs: dict) -> DeepseekV3CausalLMOutputWithPast:
        return DeepseekV3CausalLMOutputWithPast(**{name: value.detach().clone() for name, value in outputs.items()})

    def _feed(self, input_ids, labels, num_items_in_batch, loss_scale) -> None:
        # Python numbers are filled in (a kernel argument); a host tensor from pageable memory would make the copy
        # wait for the GPU to finish the previous step.
        values = {"input_ids": input_ids, "labels": labels, "loss_scale": float(loss_scale)}
        if num_items_in_batch is not None:
            values["num_items_in_batch"] = num_items_in_batch
        for name, value in values.items():
            if name not in self._inputs:
                like = torch.as_tensor(value)
                self._inputs[name] = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            if torch.is_tensor(value):
                self._inputs[name].copy_(value, non_blocking=True)
            else:
                self._inputs[name].fill_(value)

    def _static_forward_backward(self) -> dict:
        inputs = self._inputs
        return self._forward_backward(
            inputs["input_ids"], inputs["labels"], inputs.get("num_items_in_batch"), inputs["loss_scale"]
        )

    def _prepare_grads(self) -> bool:
        """Whether this call adds to gradients. All None: the write graph. Otherwise every parameter's gradient
        moves into the graph's tensor (None counts as zero; one that is not the graph's, e.g. from an eager
        step, is copied in) and the accumulate graph adds to them."""
        current = [param.grad for param in self._params]
        if all(grad is None for grad in current):
            return False
        for param, grad, static in zip(self._params, current, self._grads):
            if grad is None:
                static.zero_()
            elif grad is not static:
                static.copy_(grad)
            param.grad = static
        return True

    def _capture_write(self) -> None:
        """Warm up eagerly on a side stream, then capture the step that writes the gradients. The warm-up's
        gradients and routed-token counts are discarded, and the gradients the parameters had before are put
        back, also when the capture fails."""
        trainable = [param for param in self.model.parameters() if param.requires_grad]
        before = [param.grad for param in trainable]
        routers = self.model.expert_routers() if hasattr(self.model, "expert_routers") else []
        counts = [router.expert_load.clone() for router in routers]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    for param in trainable:
                        param.grad = None
                    self._static_forward_backward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            for param in trainable:
                param.grad = None
            torch.cuda.empty_cache()  # the warm-up's blocks; the graph allocates from its own pool
            self._capture_graph(accumulate=False)
            self._params = [param for param in trainable if param.grad is not None]
            self._grads = [param.grad for param in self._params]
        finally:
            for param, grad in zip(trainable, before):
                param.grad = grad
            with torch.no_grad():
                for router, count in zip(routers, counts):
                    router.expert_load.copy_(count)

    def _capture_graph(self, accumulate: bool) -> None:
        graph = torch.cuda.CUDAGraph()
        shared = next(iter(self._graphs.values()))[0].pool() if self._graphs else None
        try:
            with torch.cuda.graph(graph, pool=shared):
                outputs = self._static_forward_backward()
        except RuntimeError as error:
            raise RuntimeError(
                f"GraphedTrainingStep: capturing the {'accumulating' if accumulate else 'first'} training step "
                f"failed ({str(error).splitlines()[0]}). A tensor kept from an eager step before it (its loss or "
                "output) keeps that step's autograd graph, whose gradient nodes run on the default stream: delete it "
                "first. Every operation in the step must also be capturable: no host syncs (.item(), .tolist(), "
                "data-dependent shapes)."
            ) from error
        self._graphs[accumulate] = (graph, outputs)
        self.captures += 1


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


__all__ = ["DeepseekV3Trainer", "ExpertBiasUpdateCallback", "GraphedTrainingStep", "MTPLossWeightSchedule",
           "peak_bf16_flops", "set_activation_checkpointing", "training_flops_per_token"]
