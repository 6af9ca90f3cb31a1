"""Our model against transformers' built-in DeepseekV3ForCausalLM loaded from the same official-layout checkpoint."""

import pytest
import torch
import transformers
from _helpers import random_model, relative_max_diff, tiny_config
from transformers import AutoModelForCausalLM

import modeling_deepseek_v3

TOLERANCE = 1e-4  # max |ours - theirs| relative to the logit scale, float32


@pytest.fixture(params=[48, None], ids=["q_lora", "no_q_lora"])
def checkpoint(request, tmp_path):
    config = tiny_config(q_lora_rank=request.param)
    assert config.yarn_parameters is not None
    random_model(config, seed=1).save_pretrained(tmp_path)
    return tmp_path


def load_both(path):
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert isinstance(ours, modeling_deepseek_v3.DeepseekV3ForCausalLM)
    assert type(theirs).__module__.startswith("transformers.models.deepseek_v3")
    return ours, theirs


def test_prefill_logits_match_builtin(checkpoint):
    ours, theirs = load_both(checkpoint)
    input_ids = torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = ours(input_ids).logits
        their_logits = theirs(input_ids).logits
    assert relative_max_diff(ours_logits, their_logits) <= TOLERANCE


def test_greedy_decode_matches_builtin_at_every_step(checkpoint):
    ours, theirs = load_both(checkpoint)
    input_ids = torch.randint(2, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, attention_mask=torch.ones_like(input_ids), pad_token_id=0)
    ours_out = ours.generate(input_ids, **kwargs)
    their_out = theirs.generate(input_ids, **kwargs)
    assert torch.equal(ours_out.sequences, their_out.sequences)
    assert len(ours_out.logits) == 32
    for step, (a, b) in enumerate(zip(ours_out.logits, their_out.logits)):
        assert relative_max_diff(a, b) <= TOLERANCE, f"decode step {step}"


def test_decode_uses_the_absorbed_form_and_still_matches(checkpoint):
    ours, theirs = load_both(checkpoint)
    assert ours.config.attention_form == "auto"
    calls = []
    for layer in ours.model.layers:
        original = layer.self_attn._attend_absorbed
        layer.self_attn._attend_absorbed = lambda *a, _f=original: calls.append(1) or _f(*a)
    input_ids = torch.randint(2, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    out = ours.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    ref = theirs.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert len(calls) == 3 * ours.config.num_hidden_layers  # every step after the prompt
