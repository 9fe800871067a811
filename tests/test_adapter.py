"""SURAdapter (Eq. 4-7): shapes, invariants of an untrained adapter, both variants, save/load."""
import pytest
import torch

from sur_lib.adapter import KnowledgeProjection, SURAdapter, count_parameters

SD15_WIDTH, CLIP_TOKENS = 768, 77
MINILM_WIDTH, MINILM_TOKENS = 384, 16


def small(**kw):
    cfg = dict(text_dim=16, num_layers=1, num_heads=2, ffn_dim=32)
    cfg.update(kw)
    return SURAdapter(**cfg)


@pytest.mark.parametrize("llm_dim", [4096, 5120, 6656])  # LLaMA 7B / 13B / 33B
def test_shapes_sd15(llm_dim):
    torch.manual_seed(0)
    adapter = SURAdapter(text_dim=SD15_WIDTH, llm_dim=llm_dim).eval()
    x = torch.randn(2, CLIP_TOKENS, SD15_WIDTH)
    with torch.no_grad():
        out = adapter(x)
        w0k = adapter.project_knowledge(torch.randn(2, llm_dim))
    for name in ("c", "h0", "q", "student"):
        assert getattr(out, name).shape == (2, CLIP_TOKENS, SD15_WIDTH), name
    assert w0k.shape == (2, SD15_WIDTH)
    assert adapter.llm_projection.weight.shape == (SD15_WIDTH, llm_dim)


def test_shapes_minilm():
    adapter = SURAdapter(text_dim=MINILM_WIDTH, num_heads=8, ffn_dim=1024, llm_dim=576).eval()
    out = adapter(torch.randn(3, MINILM_TOKENS, MINILM_WIDTH))
    assert out.c.shape == out.q.shape == out.h0.shape == (3, MINILM_TOKENS, MINILM_WIDTH)
    assert adapter.project_knowledge(torch.randn(3, 576)).shape == (3, MINILM_WIDTH)


def test_parameter_counts_at_sd15_width():
    paper = count_parameters(SURAdapter(text_dim=SD15_WIDTH))
    official = count_parameters(SURAdapter(text_dim=SD15_WIDTH, official=True))
    print(
        f"\nSURAdapter @768: paper-faithful {paper['used'] / 1e6:.2f}M; "
        f"official {official['used'] / 1e6:.2f}M used / {official['stored'] / 1e6:.2f}M stored "
        "(authors: ~14.0M used / ~20.1M stored)"
    )
    # 2 encoder layers (5,513,984 each) + Wq, Wk, two h1 linears, g (590,592 each)
    assert paper == {"stored": 13_980_928, "used": 13_980_928}
    # + the unused template encoder layer and value projection
    assert official == {"stored": 20_085_504, "used": 13_980_928}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("eta", [0.01, 0.1, 0.5, 1.0])
def test_untrained_paper_adapter_is_exactly_scaled_input(eta, train_mode):
    adapter = small(eta=eta).train(train_mode)  # dropout on or off: g = 0 kills it either way
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x).c, (1 - eta) * x)


def test_untrained_official_adapter_is_not_x_but_adds_the_random_bias():
    torch.manual_seed(0)
    adapter = small(official=True, eta=0.1).eval()
    x = torch.randn(2, 5, 16)
    c = adapter(x).c
    assert not torch.allclose(c, x)
    assert not torch.allclose(c, 0.9 * x)
    assert adapter.fc.bias.abs().sum() > 0
    assert torch.allclose(c, 0.9 * x + 0.1 * adapter.fc.bias, atol=1e-6)


def test_paper_mode_attends_across_tokens_not_batch():
    torch.manual_seed(0)
    adapter = small(g_init="normal").eval()
    x = torch.randn(2, 5, 16)
    y = x.clone()
    y[1] += 1.0  # change the other sample
    assert torch.allclose(adapter(x).c[0], adapter(y).c[0], atol=1e-6)
    z = x.clone()
    z[0, 4] += 1.0  # change another token of the same sample
    assert not torch.allclose(adapter(x).h0[0, 0], adapter(z).h0[0, 0], atol=1e-4)


def test_official_mode_reproduces_the_batch_first_bug():
    torch.manual_seed(0)
    adapter = small(official=True, g_init="normal").eval()
    x = torch.randn(2, 5, 16)
    y = x.clone()
    y[1] += 1.0  # changing sample 1 changes sample 0's encoder output: attention over the batch
    assert not torch.allclose(adapter(x).h0[0], adapter(y).h0[0], atol=1e-4)
    z = x.clone()
    z[0, 4] += 1.0  # but the encoder never mixes tokens of one sample
    assert torch.allclose(adapter(x).h0[0, 0], adapter(z).h0[0, 0], atol=1e-6)


def test_student_tensor_per_variant():
    x = torch.randn(1, 3, 16)
    out = small().eval()(x)
    assert out.student is out.q  # Eq. 5 distils into Q
    out = small(official=True).eval()(x)
    assert out.student is out.h0  # the authors' code distils into h0


def test_g_inits():
    torch.manual_seed(0)
    assert small(g_init="zeros").fc.weight.abs().sum() == 0
    w = SURAdapter(text_dim=64, num_layers=1, num_heads=2, ffn_dim=8, g_init="kaiming_normal").fc.weight
    assert w.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)
    w = small(g_init="normal").fc.weight
    assert w.std().item() == pytest.approx(1.0, rel=0.2)
    w = small(g_init="uniform").fc.weight
    assert w.min() >= 0 and w.max() <= 1 and w.std() > 0.2
    assert small(g_init="uniform").fc.bias.abs().sum() == 0  # paper mode: bias zero for every init


def test_bad_arguments():
    with pytest.raises(ValueError, match="g_init"):
        small(g_init="xavier")
    with pytest.raises(ValueError, match="divisible"):
        small(num_heads=3)
    with pytest.raises(ValueError, match="eta"):
        small(eta=1.5)
    with pytest.raises(ValueError, match=r"\[B, N, 16\]"):
        small()(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="llm_dim"):
        small().project_knowledge(torch.randn(1, 4))


@pytest.mark.parametrize("official", [False, True])
def test_save_pretrained_round_trip(tmp_path, official):
    torch.manual_seed(0)
    adapter = small(official=official, g_init="normal", eta=0.3, llm_dim=12, w0_seed=7).eval()
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = SURAdapter.from_pretrained(tmp_path).eval()
    assert loaded.config.official == official and loaded.config.eta == 0.3
    a, b = adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and "llm_projection.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x).c, loaded(x).c)


def test_w0_is_seeded_and_saved_not_trained():
    a, b, c = small(llm_dim=8, w0_seed=1), small(llm_dim=8, w0_seed=1), small(llm_dim=8, w0_seed=2)
    assert torch.equal(a.llm_projection.weight, b.llm_projection.weight)
    assert not torch.equal(a.llm_projection.weight, c.llm_projection.weight)
    assert all("llm_projection" not in n for n, _ in a.named_parameters())


def test_load_authors_state_dict():
    src = small(official=True, g_init="normal")
    sd = {k: v for k, v in src.state_dict().items()}
    dst = small(official=True)
    dst.load_authors_state_dict(sd)
    x = torch.randn(1, 3, 16)
    assert torch.equal(src.eval()(x).c, dst.eval()(x).c)
    with pytest.raises(ValueError, match="official=True"):
        small().load_authors_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        small(official=True).load_authors_state_dict({})


# --- mixed precision and several processes (issue: the RTX 3090 path) ------------------------------


@pytest.mark.parametrize("official", [False, True])
def test_output_survives_accelerates_fp32_conversion(official):
    """accelerate's native mixed precision wraps forward with convert_outputs_to_fp32, which
    rebuilds the output as type(out)({name: tensor.float()}): that must give a full output."""
    from accelerate.utils import convert_outputs_to_fp32

    adapter = small(official=official).eval()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = convert_outputs_to_fp32(adapter.forward)(x)
    for name in ("c", "h0", "q", "student"):
        assert getattr(out, name).dtype == torch.float32 and getattr(out, name).shape == (2, 5, 16)
    rebuilt = type(out)({k: v for k, v in out.items()})
    assert torch.equal(rebuilt.c, out.c) and torch.equal(rebuilt.student, out.student)


def test_official_unused_modules_are_frozen_but_stored():
    """DDP waits for a gradient of every trainable parameter; the authors' template layer and
    value projection never get one, so they are frozen, with their state-dict names kept."""
    adapter = small(official=True)
    frozen = {n for n, p in adapter.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder_layer.", "attention.value_layer.")) for n in frozen)
    assert {n for n in adapter.state_dict() if n.startswith(("encoder_layer.", "attention.value_layer."))} == frozen
    assert all(p.requires_grad for p in small().parameters())  # the paper adapter has none
    out = adapter.train()(torch.randn(2, 5, 16))
    (out.c.square().mean() + out.student.square().mean()).backward()
    unused = {n for n, p in adapter.named_parameters() if p.requires_grad and p.grad is None}
    assert unused == set()


# --- W0 -------------------------------------------------------------------------------------------


def test_knowledge_projection_seeded_buffer():
    a, b, c = KnowledgeProjection(20, 8, seed=1), KnowledgeProjection(20, 8, seed=1), KnowledgeProjection(20, 8, seed=2)
    assert torch.equal(a.weight, b.weight)
    assert not torch.allclose(a.weight, c.weight)
    assert a.weight.shape == (8, 20)
    assert "weight" in a.state_dict() and list(a.parameters()) == []
    assert a.weight.abs().max() <= 1 / 20**0.5
    k = torch.randn(3, 20)
    torch.testing.assert_close(a(k), k @ a.weight.T)
    with pytest.raises(ValueError, match="width 21"):
        a(torch.randn(3, 21))
