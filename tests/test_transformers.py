"""attn_implementation="fastattn" in Hugging Face transformers, against "sdpa", on tiny random models.

No download: models are built from a config with random weights (from_pretrained reads a local copy).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(optional extra: pip install 'fastattn[hf]')")

import fastattn.functional  # noqa: E402
from fastattn.integrations.transformers import register  # noqa: E402

F64 = dict(atol=1e-10, rtol=1e-10)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _qwen3():
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    return transformers.Qwen3ForCausalLM(cfg)


MODELS = {"llama-gqa2": _llama, "qwen3-mqa": _qwen3}


@pytest.fixture
def calls(monkeypatch):
    register()
    seen = []
    real = fastattn.functional.attention
    monkeypatch.setattr(fastattn.functional, "attention",
                        lambda *a, **k: seen.append(k.get("causal")) or real(*a, **k))
    return seen


def _pair(name):
    torch.manual_seed(0)
    ref = MODELS[name]().double()
    ref.set_attn_implementation("sdpa")
    model = copy.deepcopy(ref)
    model.set_attn_implementation("fastattn")
    assert model.config._attn_implementation == "fastattn"
    return ref, model


@pytest.mark.parametrize("padding", [False, True], ids=["causal", "left-padded"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_and_grads_match_sdpa(name, padding, calls):
    ref, model = _pair(name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padding:
        mask[1, :3] = 0
    kw = {"attention_mask": mask} if padding else {}
    want = ref(input_ids=ids, **kw).logits
    got = model(input_ids=ids, **kw).logits
    assert len(calls) == 2, "fastattn did not run in every layer"
    assert calls == [not padding] * 2  # pure causal: mask skipped, causality in the kernel
    keep = mask.bool()  # rows of padding tokens are not compared (no key to attend in the causal view)
    torch.testing.assert_close(got[keep], want[keep], **F64)
    g = torch.randn(want.shape, generator=gen, dtype=want.dtype) * keep[..., None]
    (want * g).sum().backward()
    (got * g).sum().backward()
    for (n, pr), (_, pf) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **F64, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("name", MODELS)
def test_generate_with_cache_matches_sdpa(name, calls):
    ref, model = _pair(name)
    ref.eval()
    model.eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(calls) == 2 * 4  # prefill + 3 decode steps, 2 layers


def test_from_pretrained_with_fastattn(tmp_path, calls):
    torch.manual_seed(0)
    MODELS["llama-gqa2"]().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastattn")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert model.config._attn_implementation == "fastattn"
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert calls
