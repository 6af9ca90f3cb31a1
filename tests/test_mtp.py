"""Multi-Token Prediction: placement, wiring (paper eq. 21-25), loss and training signal."""

import torch
from _helpers import random_model, tiny_config

from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3MTPLayer, build_attention_bias


def test_mtp_modules_sit_after_the_main_layers():
    config = tiny_config(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=2)
    model = random_model(config)
    assert len(model.model.layers) == 4
    assert [type(layer) for layer in model.model.layers[2:]] == [DeepseekV3MTPLayer, DeepseekV3MTPLayer]
    keys = model.state_dict().keys()
    assert "model.layers.2.eh_proj.weight" in keys and "model.layers.3.shared_head.norm.weight" in keys
    assert model.model.layers[2].eh_proj.weight.shape == (config.hidden_size, 2 * config.hidden_size)


def test_mtp_logits_follow_the_paper_wiring_embedding_first():
    model = random_model(tiny_config(mtp_loss_weight=0.3), seed=1)
    ids = torch.randint(2, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, labels=ids)
        h0 = model.model(ids).last_hidden_state  # main final hidden state, after model.norm
        mtp = model.model.layers[model.config.num_hidden_layers]
        h_prime = mtp.eh_proj(torch.cat([mtp.enorm(model.model.embed_tokens(ids[:, 1:])), mtp.hnorm(h0[:, :-1])], -1))
        positions = torch.arange(9)[None].expand(2, 9)
        bias = build_attention_bias(None, torch.arange(9), 9, h0.dtype)
        h1, _ = super(DeepseekV3MTPLayer, mtp).forward(h_prime, model.model.rotary_emb(positions), bias)
        expected_logits = model.lm_head(mtp.shared_head.norm(h1))
    torch.testing.assert_close(out.mtp_logits[0], expected_logits)
    ce = torch.nn.functional.cross_entropy(expected_logits[:, :-1].reshape(-1, 512), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, 0.3 * ce)


def test_loss_is_main_plus_weighted_mtp_and_parts_are_exposed():
    model = random_model(tiny_config(aux_loss_alpha=0.0, mtp_loss_weight=0.3))
    ids = torch.randint(2, 512, (2, 12))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss) and torch.isfinite(out.lm_loss)
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss)
    assert model(ids).loss is None
    no_mtp = random_model(tiny_config(mtp_loss_weight=0.0))
    assert no_mtp(ids, labels=ids).mtp_loss is None


def test_gradient_reaches_the_mtp_module():
    model = random_model(tiny_config()).train()
    ids = torch.randint(2, 512, (2, 12))
    model(ids, labels=ids).loss.backward()
    mtp = model.model.layers[model.config.num_hidden_layers]
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.experts.gate_up_proj"):
        grad = mtp.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_few_optimizer_steps_lower_main_and_mtp_losses():
    model = random_model(tiny_config(mtp_loss_weight=0.3), seed=2).train()
    ids = torch.randint(2, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids, labels=ids)
    for _ in range(8):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    last = model(ids, labels=ids)
    assert last.lm_loss < 0.8 * first.lm_loss
    assert last.mtp_loss < 0.8 * first.mtp_loss
