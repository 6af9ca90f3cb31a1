"""The `decode_kernels` switch on the CPU: the Triton fast paths are CUDA-only, so the CPU forward (and any training
forward) is the eager reference whatever the switch says. Their equality with the eager ops is held by the GPU
tests in test_gpu.py (`test_decode_kernels_*`)."""

import torch
from _helpers import random_model, tiny_config
from transformers import StaticCache


def _decode_logits(model, ids):
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
        return model(ids[:, -1:], attention_mask=mask, past_key_values=cache).logits


def test_decode_kernels_switch_leaves_the_cpu_forward_on_the_eager_path():
    model = random_model(tiny_config(), seed=11)
    ids = torch.randint(2, 512, (2, 9))
    model.config.decode_kernels = True
    with_switch = _decode_logits(model, ids)
    model.config.decode_kernels = False
    assert torch.equal(with_switch, _decode_logits(model, ids))


def test_decode_kernels_is_a_saved_config_switch_on_by_default(tmp_path):
    config = tiny_config()
    assert config.decode_kernels is True
    config.decode_kernels = False
    config.save_pretrained(tmp_path)
    assert type(config).from_pretrained(tmp_path).decode_kernels is False
