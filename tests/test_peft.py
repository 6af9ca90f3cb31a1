"""PEFT adapters on the attention projections reach every path, the absorbed decode included."""

import pytest
import torch
from _helpers import random_model, relative_max_diff, tiny_config

peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e '.[dev]')")


def lora_model(form):
    model = random_model(tiny_config(attention_form=form), seed=12)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                 "kv_b_proj", "o_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def test_lora_on_kv_b_proj_is_applied_in_decode_as_in_the_naive_form():
    auto, naive = lora_model("auto"), lora_model("naive")
    ids = torch.randint(2, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  output_logits=True, return_dict_in_generate=True)
    a, b = auto.generate(input_ids=ids, **kwargs), naive.generate(input_ids=ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert relative_max_diff(x, y) < 1e-5
    plain = random_model(tiny_config(), seed=12)
    with torch.no_grad():
        assert relative_max_diff(plain(ids).logits, auto(input_ids=ids).logits) > 1e-3  # the adapters do act
