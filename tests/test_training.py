"""Training: the auxiliary-loss-free bias update, its statistics, and the Trainer integration."""

import json
import math

import pytest
import torch
from _helpers import random_model, tiny_config
from torch.utils.data import Dataset
from transformers import TrainingArguments

from modeling_deepseek_v3.training import DeepseekV3Trainer, MTPLossWeightSchedule


def skewed_model(bias_update_speed, seed=0):
    """Every token's hidden state shares one direction d, and the routers' first experts align with d (bias-free
    init): most tokens go to the same few experts."""
    model = random_model(tiny_config(bias_update_speed=bias_update_speed, aux_loss_alpha=0.0, mtp_loss_weight=0.0),
                         seed=seed)
    generator = torch.Generator().manual_seed(seed)
    d = torch.randn(model.config.hidden_size, generator=generator)
    d = d / d.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.5, generator=generator)
        model.model.embed_tokens.weight += d
        for router in model.expert_routers():
            router.e_score_correction_bias.zero_()
            router.weight.normal_(0.0, 0.1, generator=generator)
            router.weight[:4] += 0.5 * d
    return model


def balance_after_steps(model, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            model.train()
            model(torch.randint(2, 512, (4, 32), generator=generator))
            stats = model.update_expert_bias()
    return stats


def test_bias_update_balances_a_skewed_router_and_gamma_zero_does_not():
    first = balance_after_steps(skewed_model(0.01), 1)
    on = balance_after_steps(skewed_model(0.01), 60)
    off = balance_after_steps(skewed_model(0.0), 60)
    assert first["max_over_mean_load"] > 2.5  # the skew is real (4.0 = every token on the same 4 of 16 experts)
    assert on["max_over_mean_load"] < 0.6 * first["max_over_mean_load"]
    assert off["max_over_mean_load"] > 0.9 * first["max_over_mean_load"]
    assert off["bias_norm"] == 0.0 and on["bias_norm"] > 0.0


def test_update_follows_the_sign_rule_and_resets_the_counts():
    model = skewed_model(0.5)
    model.train()
    with torch.no_grad():
        model(torch.randint(2, 512, (2, 16)))
    router = model.expert_routers()[0]
    load = router.expert_load.clone()
    before = router.e_score_correction_bias.clone()
    stats = model.update_expert_bias()
    torch.testing.assert_close(router.e_score_correction_bias, before + 0.5 * torch.sign(load.mean() - load))
    assert (router.expert_load == 0).all()
    assert stats[f"layer_{router.layer_idx}/max_over_mean_load"] == pytest.approx((load.max() / load.mean()).item())
    main_moe_layers = len(model.expert_routers()) - model.config.num_nextn_predict_layers  # MTP runs with labels
    assert stats["tokens_routed"] == 2 * 16 * model.config.num_experts_per_tok * main_moe_layers  # this step's count


def test_counts_cover_every_micro_batch_so_4x1_equals_1x4():
    data = torch.randint(2, 512, (4, 24), generator=torch.Generator().manual_seed(3))
    biases = []
    for micro_batches in (data.split(1), [data]):
        model = skewed_model(0.01, seed=4).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        for batch in micro_batches:
            model(batch, labels=batch).loss.backward()
        optimizer.step()
        model.update_expert_bias()
        biases.append(torch.cat([r.e_score_correction_bias.clone() for r in model.expert_routers()]))
    assert torch.equal(biases[0], biases[1])


def test_eval_forwards_count_only_when_tracking():
    model = random_model(tiny_config())
    ids = torch.randint(2, 512, (2, 8))
    with torch.no_grad():
        model(ids)
        assert model.expert_load_statistics()["tokens_routed"] == 0
        with model.tracking_expert_load():
            model(ids)
    stats = model.expert_load_statistics(reset=True)
    n_moe_layers = len(model.expert_routers()) - model.config.num_nextn_predict_layers  # MTP runs only with labels
    assert stats["tokens_routed"] == 2 * 8 * model.config.num_experts_per_tok * n_moe_layers
    assert model.expert_load_statistics()["tokens_routed"] == 0


class RepeatedText(Dataset):
    def __init__(self, n=32, length=32):
        generator = torch.Generator().manual_seed(0)
        base = torch.randint(2, 512, (4, length), generator=generator)
        self.rows = [base[i % 4] for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def make_trainer(model, output_dir, **kwargs):
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=3e-3, logging_steps=2, save_steps=4, report_to=[], use_cpu=True,
                             seed=0, **kwargs)
    return DeepseekV3Trainer(model=model, args=args, train_dataset=RepeatedText(), mtp_loss_weight_schedule=[(0, 0.3), (3, 0.1)])


def test_trainer_lowers_the_loss_and_logs_parts_and_load_statistics(tmp_path):
    model = random_model(tiny_config(aux_loss_alpha=0.01, bias_update_speed=0.001), seed=5)
    trainer = make_trainer(model, tmp_path, max_steps=8)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < logs[0]["loss"]
    for key in ("lm_loss", "mtp_loss", "aux_loss", "expert_load/max_over_mean_load", "expert_load/bias_norm"):
        assert key in logs[0], key
    assert logs[-1]["mtp_loss"] > 0 and model.config.mtp_loss_weight == 0.1  # the schedule moved on
    first_log = logs[0]
    assert first_log["loss"] == pytest.approx(first_log["lm_loss"] + first_log["mtp_loss"] + first_log["aux_loss"], rel=1e-3)
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in model.expert_routers())


def test_trainer_checkpoint_resume_restores_weights_and_biases_exactly(tmp_path):
    model = random_model(tiny_config(bias_update_speed=0.01), seed=6)
    make_trainer(model, tmp_path, max_steps=4).train()
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "model.safetensors").exists()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = random_model(tiny_config(bias_update_speed=0.01), seed=99)
    trainer = make_trainer(fresh, tmp_path, max_steps=4)
    trainer._load_from_checkpoint(str(checkpoint))
    for key, tensor in saved.items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in fresh.expert_routers())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_mtp_weight_schedule_picks_the_last_started_phase():
    schedule = MTPLossWeightSchedule([(0, 0.3), (100, 0.1)])
    assert schedule.weight_at(0) == 0.3 and schedule.weight_at(99) == 0.3 and schedule.weight_at(100) == 0.1
    with pytest.raises(ValueError, match="starting at step 0"):
        MTPLossWeightSchedule([(5, 0.3)])


def test_training_flops_count_six_flops_per_weight_a_token_uses():
    """The FLOPs estimate for MFU equals 6 x the matmul weights one token touches, counted from the module tree
    (routed experts scaled by K/E, the MTP module's shared LM head counted again), plus the causal attention term."""
    from modeling_deepseek_v3.training import training_flops_per_token

    model = random_model(tiny_config(), seed=0)
    config = model.config
    used = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue  # norms, router bias, the embedding lookup
        n = p.numel()
        if ".experts." in name:
            n = n * config.num_experts_per_tok // config.n_routed_experts
        used += n
    used += config.num_nextn_predict_layers * model.lm_head.weight.numel()  # the MTP head is the main head again
    assert training_flops_per_token(config, seq_len=0) == 6 * used
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    extra = training_flops_per_token(config, seq_len=64) - training_flops_per_token(config, seq_len=0)
    assert extra == layers * 3 * 2 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 32
    assert training_flops_per_token(config, 0, include_mtp=False) < training_flops_per_token(config, 0)


def test_padding_is_left_out_of_the_expert_load_and_the_balance_loss():
    """A right-padded batch counts the same routed tokens, and has the same sequence-wise balance loss, as its
    sequences run alone without padding (the padding is routed, but neither counted nor balanced)."""
    model = random_model(tiny_config(aux_loss_alpha=0.01, seq_aux=True), seed=4).train()
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(2, 512, (1, 12), generator=generator), torch.randint(2, 512, (1, 7), generator=generator)
    padded = torch.cat([first, torch.cat([second, torch.zeros(1, 5, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, 7:] = 0

    def loads():
        values = [router.expert_load.clone() for router in model.expert_routers()]
        for router in model.expert_routers():
            router.expert_load.zero_()
        return values

    loads()
    with torch.no_grad():
        batch_aux = model(padded, attention_mask=mask).aux_loss
        batch_loads = loads()
        alone_aux = [model(ids).aux_loss for ids in (first, second)]
        alone_loads = loads()
    for batch_load, alone_load in zip(batch_loads, alone_loads):
        assert torch.equal(batch_load, alone_load)
    moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace  # the MTP layer runs with labels only
    assert sum(float(load.sum()) for load in batch_loads) == (12 + 7) * model.config.num_experts_per_tok * moe_layers
    assert torch.allclose(batch_aux, (alone_aux[0] + alone_aux[1]) / 2, rtol=1e-5, atol=1e-7)


def test_sequence_balance_loss_with_a_full_mask_is_the_unmasked_loss():
    from modeling_deepseek_v3.modeling_deepseek_v3 import sequence_balance_loss

    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 10, 16, generator=generator)
    topk = scores.topk(4, dim=-1).indices
    for per_sequence in (True, False):
        plain = sequence_balance_loss(scores, topk, 0.01, per_sequence)
        masked = sequence_balance_loss(scores, topk, 0.01, per_sequence, torch.ones(3, 10))
        assert torch.allclose(plain, masked)
        # f_i * P_i written out for one sequence: E / (K T) * count_i * mean_t s'_{i,t}
        if per_sequence:
            s = scores[0] / scores[0].sum(-1, keepdim=True)
            count = torch.bincount(topk[0].reshape(-1), minlength=16).float()
            by_hand = 0.01 * (16 / (4 * 10) * count * s.mean(0)).sum()
            single = sequence_balance_loss(scores[:1], topk[:1], 0.01, True)
            assert torch.allclose(single, by_hand)


def test_graphed_training_step_without_capture_is_the_model_s_own_step():
    """On the CPU GraphedTrainingStep runs each call eagerly: the same losses and gradients as calling the model and
    backward, and gradients add up over calls until they are zeroed. (The captured form: tests/test_gpu.py.)"""
    from modeling_deepseek_v3.training import GraphedTrainingStep

    reference = random_model(tiny_config()).train()
    stepped = random_model(tiny_config()).train()
    step = GraphedTrainingStep(stepped)
    assert not step.capture
    ids = torch.randint(2, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        out = reference(input_ids=ids, labels=ids)
        out.loss.backward()
        ours = step(ids, ids)
        for name in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            torch.testing.assert_close(getattr(ours, name), getattr(out, name).detach())
        assert ours.logits is None and not ours.loss.requires_grad
    for (name, param), mine in zip(reference.named_parameters(), stepped.parameters()):
        if param.grad is not None:
            torch.testing.assert_close(mine.grad, param.grad, msg=name)
    for ours, theirs in zip(stepped.expert_routers(), reference.expert_routers()):
        assert torch.equal(ours.expert_load, theirs.expert_load)


def test_graphed_training_step_rejects_what_it_cannot_replay():
    from modeling_deepseek_v3.training import GraphedTrainingStep

    model = random_model(tiny_config()).train()
    with pytest.raises(ValueError, match="capture needs every parameter on one CUDA device"):
        GraphedTrainingStep(model, capture=True)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = model

    with pytest.raises(ValueError, match="found a Wrapper wrapper"):
        GraphedTrainingStep(Wrapper())
    step = GraphedTrainingStep(model)
    ids = torch.randint(2, 512, (2, 16))
    with pytest.raises(ValueError, match=r"labels has shape \[2, 15\], expected input_ids' shape \[2, 16\]"):
        step(ids, ids[:, 1:])
    with pytest.raises(ValueError, match="input_ids must be integer"):
        step(ids.float(), ids)


@pytest.mark.parametrize("loss_kwargs", [True, False])
def test_trainer_with_cuda_graph_step_trains_exactly_as_trainer_s_own_step(tmp_path, loss_kwargs):
    """`cuda_graph_step=True` (its eager form on the CPU; the captured form equals it: tests/test_gpu.py) against
    Trainer's own step, with gradient accumulation 2: the same weights, balancing biases and logged losses, with the
    loss summed over the step's token count (the model takes Trainer's loss kwargs) and as a mean per micro-batch."""
    runs = []
    for graphed in (False, True):
        model = random_model(tiny_config(aux_loss_alpha=0.01, bias_update_speed=0.001), seed=5)
        args = TrainingArguments(output_dir=str(tmp_path / str(graphed)), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=2, max_steps=4,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0)
        trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=RepeatedText(), cuda_graph_step=graphed,
                                    mtp_loss_weight_schedule=[(0, 0.3), (3, 0.1)])
        trainer.model_accepts_loss_kwargs = loss_kwargs
        trainer.train()
        assert (trainer._graphed is not None) == graphed
        runs.append((model, [entry for entry in trainer.state.log_history if "loss" in entry]))
    (reference, reference_logs), (ours, our_logs) = runs
    for (name, expected), actual in zip(reference.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    for expected, actual in zip(reference_logs, our_logs):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert actual[key] == pytest.approx(expected[key], rel=1e-5), key


def test_bias_update_and_its_callback_read_nothing_to_the_host_until_the_statistics_are_logged():
    """`update_expert_bias(as_tensors=True)` and the Trainer callback keep the statistics on the device (no
    `.item()`-style read, which is a host sync on a GPU); the values equal the float statistics of the same step,
    and the logged means skip steps that counted no token."""
    from _helpers import HostReads

    from modeling_deepseek_v3.training import ExpertBiasUpdateCallback

    with HostReads() as reads:
        float(torch.ones(()))
    assert reads.count == 1  # the detector sees a read

    ids = torch.randint(2, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for as_tensors in (False, True):
        model = skewed_model(0.01).train()
        with torch.no_grad():
            model(ids)
        with HostReads() as reads:
            stats = model.update_expert_bias(as_tensors=as_tensors)
        results.append((model, stats, reads.count))
    (float_model, floats, _), (tensor_model, tensors, tensor_reads) = results
    assert tensor_reads == 0 and all(torch.is_tensor(value) for value in tensors.values())
    assert tensors.keys() == floats.keys()
    for key, value in floats.items():
        assert tensors[key].item() == pytest.approx(value, rel=1e-12, nan_ok=True), key
    for ours, reference in zip(tensor_model.expert_routers(), float_model.expert_routers()):
        assert torch.equal(ours.e_score_correction_bias, reference.e_score_correction_bias)

    callback = ExpertBiasUpdateCallback()
    model = skewed_model(0.01).train()
    ratios = []
    for step in range(3):
        if step != 1:  # step 1 counts no token: its load ratios are NaN and left out of the means
            with torch.no_grad():
                model(ids)
        ratios.append(model.expert_load_statistics()["max_over_mean_load"])
        with HostReads() as reads:
            callback.on_step_end(None, None, None, model=model)
        assert reads.count == 0
    assert math.isnan(ratios[1]) and callback.latest_statistics["max_over_mean_load"] == pytest.approx(ratios[2])
    means = callback.pending_statistics()
    assert means["expert_load/max_over_mean_load"] == pytest.approx((ratios[0] + ratios[2]) / 2)
    assert callback.pending_statistics() == {}


def test_load_statistics_of_a_model_without_moe_layers_and_of_layers_without_tokens():
    dense = random_model(tiny_config(first_k_dense_replace=3, num_nextn_predict_layers=0))
    assert dense.expert_routers() == []
    stats = dense.update_expert_bias()
    assert math.isnan(stats["max_over_mean_load"]) and stats["bias_norm"] == 0.0 and stats["tokens_routed"] == 0.0
    model = random_model(tiny_config())
    stats = model.expert_load_statistics()  # nothing counted yet
    assert math.isnan(stats["max_over_mean_load"]) and math.isnan(stats["max_over_mean_load_worst"])
    assert stats["tokens_routed"] == 0.0 and stats["bias_norm"] > 0.0  # random_model's biases are not zero
