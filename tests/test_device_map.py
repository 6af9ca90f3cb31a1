"""Placement with accelerate's device_map: offloaded layers give the same generation as the plain model."""

import torch
from _helpers import random_model, tiny_config
from transformers import AutoModelForCausalLM


def test_cpu_and_disk_offload_generate_equals_the_plain_model(tmp_path):
    model = random_model(tiny_config(), seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    assert offloaded.model.layers[1].self_attn.kv_b_proj.weight.device.type == "meta"  # really offloaded
    ids = torch.randint(2, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  output_logits=True, return_dict_in_generate=True)
    plain, off = model.generate(ids, **kwargs), offloaded.generate(ids, **kwargs)
    assert torch.equal(plain.sequences, off.sequences)
    for a, b in zip(plain.logits, off.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
