"""Multi-head Latent Attention: absorbed vs naive form, the latent cache, and the transformers Cache API."""

import pytest
import torch
import transformers
from _helpers import random_model, relative_max_diff, tiny_config
from transformers import DynamicCache

from modeling_deepseek_v3.modeling_deepseek_v3 import CACHE_FIELD


def prompt(batch=2, length=12, seed=0):
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_absorbed_attention_equals_naive_attention_in_prefill_and_decode():
    naive = random_model(tiny_config(attention_form="naive"), seed=3)
    absorbed = random_model(tiny_config(attention_form="absorbed"), seed=3)
    ids = prompt()
    with torch.no_grad():
        cache_n, cache_a = DynamicCache(config=naive.config), DynamicCache(config=absorbed.config)
        out_n = naive(ids, past_key_values=cache_n)
        out_a = absorbed(ids, past_key_values=cache_a)
        assert relative_max_diff(out_a.logits, out_n.logits) < 1e-5
        next_ids = prompt(length=3, seed=1)  # a 3-token continuation attends to the cached prompt
        step_n = naive(next_ids, past_key_values=cache_n).logits
        step_a = absorbed(next_ids, past_key_values=cache_a).logits
    assert relative_max_diff(step_a, step_n) < 1e-5


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_eager_and_sdpa_attention_agree(form):
    eager = random_model(tiny_config(attention_form=form), seed=4)
    eager.config._attn_implementation = "eager"
    sdpa = random_model(tiny_config(attention_form=form), seed=4)
    sdpa.config._attn_implementation = "sdpa"
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    assert relative_max_diff(a[0, 3:], b[0, 3:]) < 1e-5
    assert relative_max_diff(a[1], b[1]) < 1e-5


@pytest.mark.parametrize("dtype, nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_latent_cache_holds_kv_lora_rank_plus_rope_dims_per_token(dtype, nbytes):
    config = tiny_config()
    model = random_model(config, dtype=dtype)
    ids = prompt(batch=3, length=7)
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
    assert len(cache.layers) == config.num_hidden_layers
    per_token_per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    for layer in cache.layers:
        c_kv, k_pe = layer.keys, layer.values
        assert c_kv.shape == (3, 1, 7, config.kv_lora_rank)
        assert k_pe.shape == (3, 1, 7, config.qk_rope_head_dim)
        total = c_kv.numel() * c_kv.element_size() + k_pe.numel() * k_pe.element_size()
        assert total == 3 * 7 * per_token_per_layer * nbytes


def test_cache_holds_the_normalized_latent_and_the_rotated_rope_key():
    model = random_model(tiny_config())
    ids = prompt(batch=1, length=5)
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
        attn = model.model.layers[0].self_attn
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        cos, sin = model.model.rotary_emb(torch.arange(5)[None])
        from modeling_deepseek_v3.modeling_deepseek_v3 import apply_rotary_interleaved

        torch.testing.assert_close(cache.layers[0].keys[:, 0], attn.kv_a_layernorm(c_kv))
        torch.testing.assert_close(cache.layers[0].values[:, 0], apply_rotary_interleaved(k_pe, cos, sin))


def test_static_cache_generation_equals_dynamic_cache_generation():
    model = random_model(tiny_config(), seed=5)
    ids = prompt()
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, attention_mask=torch.ones_like(ids), pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        assert relative_max_diff(a, b) < 1e-5


def test_left_padded_batch_generation_equals_one_by_one_generation():
    model = random_model(tiny_config(), seed=6)
    prompts = [prompt(1, n, seed=n)[0] for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(p):]), f"prompt {row}"
        for a, b in zip(batched.logits, alone.logits):
            assert relative_max_diff(a[row], b[0]) < 1e-4


def test_beam_search_matches_builtin(tmp_path):
    model = random_model(tiny_config(), seed=7)
    model.save_pretrained(tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = prompt(batch=2, length=6)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, **kwargs), theirs.generate(ids, **kwargs))


def test_cropped_cache_continues_like_a_fresh_prefill():
    model = random_model(tiny_config(), seed=8)
    ids = prompt(batch=1, length=10)
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
        cache.crop(-4)  # drop the last 4 tokens
        assert cache.get_seq_length() == 6
        continued = model(ids[:, 6:], past_key_values=cache).logits
        fresh = model(ids).logits[:, 6:]
    assert relative_max_diff(continued, fresh) < 1e-5


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_prompt_without_padding_uses_causal_only_attention_equal_to_an_explicit_mask(form):
    model = random_model(tiny_config(attention_form=form), seed=9)
    ids = prompt(batch=2, length=10)
    mask = torch.ones_like(ids)
    mask[1, 0] = 0  # forces the explicit bias for row 1; row 0 is compared against the causal-only run
    with torch.no_grad():
        causal_only = model(ids).logits
        same_with_ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        explicit = model(ids, attention_mask=mask).logits
    assert torch.equal(causal_only, same_with_ones)
    assert relative_max_diff(explicit[0], causal_only[0]) < 1e-5


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_static_cache_prompt_attends_only_to_the_written_slots(attn_implementation):
    """A prompt on a long static cache builds no bias over its unwritten slots (O(T * max_cache_len) memory) and
    gives the dynamic cache's logits, with and without left padding; decoding on after it still matches."""
    from _helpers import LargestAllocation
    from transformers import StaticCache

    model = random_model(tiny_config(), seed=21)
    model.config._attn_implementation = attn_implementation
    T, S = 256, 8192
    ids = torch.randint(2, 512, (1, T))
    for mask in (torch.ones_like(ids), torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, T - 7, dtype=torch.long)], 1)):
        cache = StaticCache(config=model.config, max_cache_len=S)
        with torch.no_grad(), LargestAllocation() as allocation:
            static = model(ids, attention_mask=mask, past_key_values=cache).logits
        # The cache's latent tensor is S * 32 * 4 bytes (1 MB); a [T, S] bias, or even a boolean [T, S] mask, is 2 MB.
        assert allocation.nbytes < T * S
        with torch.no_grad():
            dynamic_cache = DynamicCache(config=model.config)
            dynamic = model(ids, attention_mask=mask, past_key_values=dynamic_cache).logits
            real = mask.bool()
            assert relative_max_diff(static[real], dynamic[real]) < 1e-5
            step_mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            token = dynamic[:, -1:].argmax(-1)
            next_static = model(token, attention_mask=step_mask, past_key_values=cache).logits
            next_dynamic = model(token, attention_mask=step_mask, past_key_values=dynamic_cache).logits
        assert relative_max_diff(next_static, next_dynamic) < 1e-5


def test_beam_reordering_of_a_static_cache_is_copied_back_into_the_graphs_tensors():
    """Beam search's `reorder_cache` replaces a static cache's tensors; a captured decode graph addresses the old
    ones, so the replay first copies the reordered contents back into them (`restore_cache_tensors`)."""
    from transformers import StaticCache

    from modeling_deepseek_v3.modeling_deepseek_v3 import restore_cache_tensors

    model = random_model(tiny_config(), seed=3)
    ids = torch.randint(2, 512, (2, 12))
    cache = StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
    captured = [(layer.keys, layer.values) for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.layers[0].keys is not captured[0][0]  # what a captured graph would no longer see
    reordered = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    restore_cache_tensors(cache, captured)
    for layer, (keys, values), (new_keys, new_values) in zip(cache.layers, captured, reordered):
        assert layer.keys is keys and layer.values is values
        assert torch.equal(keys, new_keys) and torch.equal(values, new_values)


def test_beam_search_on_a_static_cache_equals_beam_search_on_a_dynamic_cache():
    model = random_model(tiny_config(), seed=3)
    ids = torch.randint(2, 512, (2, 12))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), model.generate(ids, **kwargs))


GENERATE_CASES = {
    "greedy": dict(do_sample=False, max_new_tokens=12),
    "one token": dict(do_sample=False, max_new_tokens=1),
    "sampling, top-k, temperature": dict(do_sample=True, max_new_tokens=12, top_k=5, temperature=0.7),
    "processors": dict(do_sample=False, max_new_tokens=12, min_new_tokens=10, repetition_penalty=1.3),
    # Most tokens end a row: the rows finish at different steps and the whole batch before the length limit.
    "eos, greedy": dict(do_sample=False, max_new_tokens=20, eos_token_id=list(range(2, 200)), pad_token_id=0),
    "eos, sampling": dict(do_sample=True, max_new_tokens=20, eos_token_id=list(range(2, 100)), pad_token_id=0),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_loop_on_the_decode_graph_equals_transformers_loop(monkeypatch, case):
    """`sample_on_decode_graph` (generate()'s loop with the stop flag read STOP_CHECK_LAG steps late and the steps
    past the end dropped) returns what transformers' `_sample` returns. On the CPU the DecodeGraph runs its step
    eagerly on the same buffers; `serves` is forced to take the path (on CUDA it is taken as is)."""
    from modeling_deepseek_v3 import modeling_deepseek_v3 as modeling

    loops = []
    original = modeling.sample_on_decode_graph
    monkeypatch.setattr(modeling.DecodeGraph, "serves", staticmethod(lambda x: True))
    monkeypatch.setattr(modeling, "sample_on_decode_graph", lambda *args: loops.append(1) or original(*args))
    model = random_model(tiny_config(), seed=3)
    ids = torch.randint(2, 512, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    outputs = []
    for graph in (True, False):
        model.config.cuda_graph_decode = graph
        torch.manual_seed(1)
        outputs.append(model.generate(ids, attention_mask=mask, cache_implementation="static", **GENERATE_CASES[case]))
    assert loops == [1], "generate() did not run sample_on_decode_graph"
    assert outputs[0].shape == outputs[1].shape and torch.equal(outputs[0], outputs[1])
    # Greedy without processors picks the tokens inside the graph step (its key ends with the eos ids).
    picks_in_graph = any(key[-1] is not None for key in model.__dict__.get("_decode_graphs", {}))
    assert picks_in_graph == (case in ("greedy", "eos, greedy"))
    if case.startswith("eos"):
        assert outputs[0].shape[1] < ids.shape[1] + 20  # stopped on end-of-sequence, before the length limit
