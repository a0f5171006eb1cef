"""attn_implementation="fastattn" in Hugging Face transformers, against "sdpa", on tiny random models.

No download: models are built from a config with random weights (from_pretrained reads a local copy).
"""
import copy
import importlib.util
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(optional extra: pip install 'fastattn[hf]')")

import fastattn.functional  # noqa: E402
import fastattn.integrations.transformers  # noqa: E402
import fastattn.reference  # noqa: E402
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


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of each public op the integration may take (what the integration remembers of earlier
    masks is forgotten first)."""
    register()
    monkeypatch.setattr(fastattn.integrations.transformers, "_last", {})
    seen = {}
    for op in ("attention", "attention_with_kvcache", "varlen_attention"):
        real = getattr(fastattn.functional, op)
        monkeypatch.setattr(fastattn.functional, op, (lambda op, real: lambda *a, **k: seen.update(
            {op: seen.get(op, 0) + 1}) or real(*a, **k))(op, real))
    return seen


@pytest.mark.parametrize("name", MODELS)
def test_generate_decodes_over_the_cache_with_attention_with_kvcache(name, spy):
    ref, model = _pair(name)
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        assert torch.equal(eager.generate(ids, **kw), want)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    # the prefill on the general path, the 5 decode steps over the cache, in both layers
    assert spy == {"attention": 2, "attention_with_kvcache": 2 * 5}


def test_padded_batch_decodes_on_the_general_path(spy):
    """Left padding masks the first keys, which cache lengths cannot say: the mask decides, as in sdpa. A chunk
    over a cache without padding first, whose mask is read and found causal: that verdict must not stand in for
    the padded batch's masks."""
    ref, model = _pair("llama-gqa2")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model(ids[:, 2:], cache=model(ids[:, :2], use_cache=True).cache, use_cache=True)
        assert spy.pop("attention_with_kvcache") == 2
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    assert spy == {"attention": 2 + 2 * 4}


def test_several_query_rows_over_a_cache_are_causal_from_its_end(spy):
    """A chunk of 3 tokens after a cached prefix (speculative decoding, chunked prefill): the chunk's rows see
    the cache and the chunk causally, the mask transformers builds for it; the op's causal mode is that mask."""
    ref, model = _pair("qwen3-mqa")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = []
        for m in (ref, model):
            cache = m(ids[:, :5], use_cache=True).cache
            logits.append(m(ids[:, 5:], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], **F64)
    assert spy == {"attention": 2, "attention_with_kvcache": 2}


def test_training_never_takes_the_forward_only_op(spy):
    """With gradients to compute, query rows over a cache (prefix tuning) keep the differentiable path."""
    ref, model = _pair("llama-gqa2")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(7))
    cache = model(ids[:, :4], use_cache=True).cache
    model(ids[:, 4:], cache=cache, use_cache=True).logits.sum().backward()
    assert spy == {"attention": 4}


def _packed(lens, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 64, (n,), generator=gen) for n in lens]
    return seqs, transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in seqs])


@pytest.mark.parametrize("kwargs", ["position_ids", "flash_attn_kwargs", "with_cache"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_sequences_run_varlen_and_match_separate_runs(name, kwargs, spy):
    ref, model = _pair(name)
    seqs, batch = _packed([5, 1, 3, 7], seed=8)
    batch.pop("labels")
    use_cache = kwargs == "with_cache"
    if kwargs != "flash_attn_kwargs":
        for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            batch.pop(k)
    with torch.no_grad():
        want = torch.cat([ref(s[None], use_cache=False).logits for s in seqs], 1)
    got = model(**batch, use_cache=use_cache).logits
    torch.testing.assert_close(got, want, **F64)
    assert spy == {"varlen_attention": 2}


def test_packed_training_matches_sdpa_logits_and_grads(spy):
    """sdpa runs the packed row under the block-causal mask transformers builds; fastattn runs varlen. Same
    loss, same gradients for every parameter."""
    ref, model = _pair("llama-gqa2")
    _, batch = _packed([6, 2, 9], seed=9)
    losses = [m(**batch, use_cache=False).loss for m in (ref, model)]
    torch.testing.assert_close(losses[1], losses[0], **F64)
    for loss in losses:
        loss.backward()
    for (n, pr), (_, pf) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **F64, msg=lambda m: f"grad of {n}: {m}")
    assert spy == {"varlen_attention": 2}


def test_packed_row_with_another_mask_takes_the_general_path(spy):
    """A padding mask beside packed position ids is not the packed row's causal mask: transformers then lets
    the sequences see each other (no packing), and so does fastattn, by following the mask."""
    ref, model = _pair("llama-gqa2")
    _, batch = _packed([4, 6], seed=10)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -1] = 0
    with torch.no_grad():
        want = ref(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False).logits
        got = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[0, :-1], want[0, :-1], **F64)
    assert spy == {"attention": 2}


def test_a_mask_changed_in_place_is_read_again(spy):
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen, dtype=torch.float64) for h, n in ((4, 3), (2, 7), (2, 7)))
    mask = torch.ones(3, 7, dtype=torch.bool).tril(4).expand(2, 1, 3, 7).clone()
    attend = fastattn.integrations.transformers.attention_forward
    with torch.no_grad():
        attend(torch.nn.Module(), q, k, v, mask)
        assert spy == {"attention_with_kvcache": 1}
        mask[0, 0, :, 0] = False
        got, _ = attend(torch.nn.Module(), q, k, v, mask)
    torch.testing.assert_close(got, fastattn.reference.attention(q, k, v, mask).transpose(1, 2), **F64)
    assert spy == {"attention_with_kvcache": 1, "attention": 1}


def test_generate_kvcache_example_runs(spy, capsys):
    """examples/generate_kvcache.py at tiny sizes: identical tokens, its decoding steps on attention_with_kvcache."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "generate_kvcache.py"
    spec = importlib.util.spec_from_file_location("generate_kvcache", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--batch", "2", "--prompt", "5", "--new-tokens", "4", "--layers", "1", "--hidden", "32",
                         "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "identical tokens" in out and out.count("tokens/s") == 2
    assert spy["attention_with_kvcache"] == 2 * 3  # warm-up and timed run, 3 decoding steps, 1 layer


def _gemma2():
    """Gemma 2's attention: a sliding-window layer and a full one, both with a logit softcap."""
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                    max_position_embeddings=64, layer_types=["sliding_attention", "full_attention"])
    return transformers.Gemma2ForCausalLM(cfg)


@pytest.mark.parametrize("padding", [False, True], ids=["causal", "left-padded"])
def test_gemma2_softcap_and_sliding_window_match_eager(padding, monkeypatch):
    """Gemma 2 runs on the kernels: softcap in both layers, the sliding layer's causal-window mask as a window
    (no mask) where it is exactly that, read as a mask where padding changes it. Eager runs its softmax in
    float32 even for float64 models, hence the tolerance; the mask path gives the window path's logits exactly.
    Eager turns a left-padded row into NaN: that row is compared with eager on its tokens alone (RoPE sees the
    same relative positions)."""
    register()
    monkeypatch.setattr(fastattn.integrations.transformers, "_last", {})
    torch.manual_seed(0)
    eager = _gemma2().double()
    eager.set_attn_implementation("eager")
    model = copy.deepcopy(eager)
    model.set_attn_implementation("fastattn")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    if padding:
        mask[1, :3] = 0
    seen = []
    real = fastattn.functional.attention
    monkeypatch.setattr(fastattn.functional, "attention", lambda *a, **k: seen.append(k) or real(*a, **k))
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).logits
        if padding:
            want[1, 3:] = eager(input_ids=ids[1:, 3:]).logits[0]
        got = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(fastattn.integrations.transformers, "_is_sliding_causal", lambda m, w: False)
        masked = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[keep], masked[keep], **F64)
    sliding, full = seen[:2]
    assert sliding["softcap"] == full["softcap"] == 2.0
    if padding:
        assert sliding["window_size"] == (-1, -1) and sliding["attn_mask"] is not None
    else:
        assert sliding["window_size"] == (3, 0) and sliding["attn_mask"] is None
        assert sliding["causal"] == "bottom_right" and full["causal"] is True


def test_gemma2_generate_matches_eager():
    """Greedy decoding of the softcapped model: the steps over the cache take the general path (the kv-cache
    op has no softcap) and pick eager's tokens."""
    register()
    torch.manual_seed(0)
    eager = _gemma2().double().eval()
    eager.set_attn_implementation("eager")
    model = copy.deepcopy(eager)
    model.set_attn_implementation("fastattn")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), eager.generate(ids, **kw))
