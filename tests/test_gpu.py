"""GPU checks (skipped without CUDA): the fast paths on the device they are for."""

import pytest
import torch
import transformers
from _helpers import random_model, relative_max_diff, tiny_config

from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, _grouped_mm

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_grouped_mm_equals_eager_experts_on_cuda_bf16():
    config = tiny_config(hidden_size=256, moe_intermediate_size=128)
    torch.manual_seed(0)
    experts = DeepseekV3Experts(config).cuda().bfloat16()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.randint(0, 11, (300, config.num_experts_per_tok), device="cuda")
    topk_weight = torch.rand(300, config.num_experts_per_tok, device="cuda")
    eager = experts._forward_eager(x, topk_idx, topk_weight)
    grouped = experts._forward_grouped_mm(x, topk_idx, topk_weight)
    assert relative_max_diff(grouped, eager) < 2e-2


def test_cuda_float32_logits_and_greedy_tokens_match_builtin(tmp_path):
    random_model(tiny_config(), seed=1).save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    ids = torch.randint(2, 512, (2, 16), device="cuda")
    with torch.no_grad():
        assert relative_max_diff(ours(ids).logits, theirs(ids).logits) <= 1e-4
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours.generate(ids, **kwargs), theirs.generate(ids, **kwargs))


def test_cuda_bf16_static_and_dynamic_cache_agree_with_absorbed_decode():
    model = random_model(tiny_config(), seed=2).cuda().to(torch.bfloat16)
    ids = torch.randint(2, 512, (2, 12), device="cuda")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    for a, b in zip(dynamic.logits, static.logits):
        assert relative_max_diff(a, b) < 2e-2
