"""ZayaConfig: presets, validation, and the transformers config.json mapping."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from zaya_jax import ZayaConfig, load_preset


def test_zaya1_8b_preset_has_the_published_architecture():
    c = load_preset("zaya1-8b")
    expected = dict(hidden_size=2048, num_layers=40, query_heads=8, kv_heads=2, head_dim=128, num_experts=16,
                    experts_per_token=1, expert_hidden_size=2048, router_hidden_size=256, conv_kernel_depthwise=2,
                    conv_kernel_grouped=2, rope_theta=5e6, rotary_fraction=0.5, vocab_size=262272,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072)
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.router_classes == 17 and c.rotary_dim == 64 and c.conv_channels == 1280 and c.conv_history == 2


def test_zaya1_base_differs_only_in_rope_and_context():
    base, eight = load_preset("zaya1-base"), load_preset("zaya1-8b")
    diff = {f.name for f in dataclasses.fields(ZayaConfig) if getattr(base, f.name) != getattr(eight, f.name)}
    assert diff == {"rope_theta", "max_position_embeddings"}
    assert base.rope_theta == 1e6 and base.max_position_embeddings == 32768


@pytest.mark.parametrize("preset", ["tiny", "zaya1-8b", "zaya1-base"])
def test_to_hf_builds_transformers_config_and_round_trips(preset):
    ours = load_preset(preset)
    hf = transformers.ZayaConfig(**ours.to_hf())
    assert hf.num_attention_heads == ours.query_heads and hf.num_key_value_heads == ours.kv_heads
    assert hf.cca_time0 == ours.conv_kernel_depthwise and hf.moe_intermediate_size == ours.expert_hidden_size
    assert hf.rope_parameters["hybrid"]["rope_theta"] == ours.rope_theta
    back = ZayaConfig.from_hf(hf.to_dict())
    assert back == ours


def test_from_hf_reads_the_published_native_config():
    # The Zyphra/ZAYA1-8B config.json fields (reference section 1.1), including the stray top-level rope_type.
    published = {
        "architectures": ["ZayaForCausalLM"], "model_type": "zaya", "hidden_size": 2048, "num_hidden_layers": 40,
        "layer_types": ["hybrid"] * 40, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
        "num_experts": 16, "num_experts_per_tok": 1, "moe_intermediate_size": 2048, "router_hidden_size": 256,
        "cca_time0": 2, "cca_time1": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_type": "default",
        "rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": 5000000, "partial_rotary_factor": 0.5},
                            "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000}},
        "max_position_embeddings": 131072, "vocab_size": 262272, "tie_word_embeddings": True,
        "attention_bias": False, "lm_head_bias": False, "sliding_window": None, "bos_token_id": 2,
        "eos_token_id": 106, "pad_token_id": 0, "initializer_range": 0.02, "dtype": "bfloat16",
    }
    assert ZayaConfig.from_hf(published) == load_preset("zaya1-8b")


@pytest.mark.parametrize(
    "changes, field, reason",
    [
        (dict(query_heads=6, kv_heads=4), "query_heads", "divisible by kv_heads"),
        (dict(rotary_fraction=0.3), "rotary_fraction", "even integer"),
        (dict(head_dim=6, rotary_fraction=0.5), "rotary_fraction", "even integer"),
        (dict(experts_per_token=2), "experts_per_token", "top-1"),
        (dict(conv_kernel_depthwise=0), "conv_kernel_depthwise", ">= 1"),
        (dict(conv_kernel_grouped=-1), "conv_kernel_grouped", ">= 1"),
        (dict(hidden_size=0), "hidden_size", ">= 1"),
        (dict(kv_heads=1, head_dim=7, query_heads=1, rotary_fraction=1.0), "kv_heads * head_dim", "even"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps", "> 0"),
        (dict(dtype="float16"), "dtype", "float32, bfloat16"),
        (dict(moe_impl="magic"), "moe_impl", "sorted, dense"),
        (dict(moe_impl="padded"), "moe_impl", "needs expert_capacity_factor"),
        (dict(expert_capacity_factor=1.25), "expert_capacity_factor", "applies to moe_impl 'padded'"),
        (dict(attention_impl="flash"), "attention_impl", "xla"),
        (dict(eos_token_id=300), "eos_token_id", "outside the vocabulary"),
        (dict(num_layers=2.0), "num_layers", "wrong type"),
        (dict(rope_theta="5e6"), "rope_theta", "wrong type"),
    ],
)
def test_invalid_values_name_field_and_reason(changes, field, reason):
    with pytest.raises(ValueError) as err:
        load_preset("tiny").replace(**changes)
    assert field in str(err.value) and reason in str(err.value)


def test_unknown_key_suggests_the_closest_field(tmp_path):
    with pytest.raises(ValueError, match="unknown ZayaConfig field 'kv_head'; did you mean kv_heads"):
        load_preset("tiny").replace(kv_head=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nnum_expert: 4\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown ZayaConfig field 'num_expert'; did you mean num_experts"):
        ZayaConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="unknown preset 'tinyy'; known presets: tiny"):
        load_preset("tinyy")


def test_hf_values_this_implementation_does_not_follow_are_errors():
    base = load_preset("tiny").to_hf()
    for key, value, message in [
        ("model_type", "llama", "model_type must be 'zaya'"),
        ("attention_bias", True, "attention_bias=True is not supported"),
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
        ("layer_types", ["hybrid", "hybrid_sliding", "hybrid", "hybrid"], "layer_types other than 'hybrid'"),
        ("num_experts_per_tok", 2, "experts_per_token must be 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            ZayaConfig.from_hf({**base, key: value})


def test_yaml_round_trip(tmp_path):
    c = load_preset("zaya1-8b").replace(remat_policy="dots", eos_token_id=(1, 106))
    c.to_yaml(tmp_path / "c.yaml")
    assert ZayaConfig.from_yaml(tmp_path / "c.yaml") == c
