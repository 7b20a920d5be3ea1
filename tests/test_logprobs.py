"""logprobs.py: the chunked log-probabilities, entropies and S2 against a plain log_softmax (float64,
float32, bf16, the Qwen vocabulary size), their gradients, and the edge cases (masked vocabulary, one-hot)."""
import math

import pytest
import torch

import logprobs
from conftest import intervention_batch, naive_entropy, random_batch
from logprobs import token_entropy, token_logprobs


# ------------------------------------------------------------------------------- token statistics
def naive_stats(logits, tokens):
    lsm = torch.log_softmax(logits.double(), -1)
    p = lsm.exp()
    h = -(p * lsm).sum(-1)
    s2 = (p * p * (lsm + h[..., None])).sum(-1)
    return lsm.gather(-1, tokens[..., None]).squeeze(-1), h, s2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunked_statistics_equal_naive(dtype, tol, chunk):
    b = random_batch(B=3, T=5, V=37, seed=1)
    logits = b["logits"].to(dtype)                                        # compare on the same rounded logits
    lp = token_logprobs(logits, b["tokens"], chunk_size=chunk)
    h, s2 = token_entropy(logits, exact_term=True, chunk_size=chunk)
    lp_n, h_n, s2_n = naive_stats(logits, b["tokens"])
    for got, want in ((lp, lp_n), (h, h_n), (s2, s2_n)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert token_entropy(logits).shape == (3, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_logprob_gradient_equals_naive(dtype):
    b = random_batch(B=2, T=3, V=29, seed=2)
    logits = b["logits"].to(dtype).requires_grad_(True)
    w = torch.randn(2, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((token_logprobs(logits, b["tokens"], chunk_size=2) * w).sum(), logits)
    ref = logits.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((naive_stats(ref, b["tokens"])[0] * w).sum(), ref)
    assert g.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


def test_statistics_at_qwen_vocabulary_size():
    V = 151_936
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, V, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, V, (2, 3), generator=g)
    lp = token_logprobs(logits, tokens)
    h, s2 = token_entropy(logits, exact_term=True)
    lp_n, h_n, s2_n = naive_stats(logits, tokens)
    torch.testing.assert_close(lp.double(), lp_n, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.double(), h_n, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s2.double(), s2_n, rtol=1e-4, atol=1e-6)


def test_entropy_edge_cases():
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]])
    h, s2 = token_entropy(masked, exact_term=True)
    torch.testing.assert_close(h, torch.tensor([math.log(2)]))
    torch.testing.assert_close(s2, torch.tensor([0.0]))                   # pi_b (l_b + H) = 0 when uniform
    h, s2 = token_entropy(one_hot, exact_term=True)
    assert h.item() == 0.0 and s2.item() == 0.0
    h = token_entropy(torch.tensor([[1e4, 0.0, -1e4]]))
    assert torch.isfinite(h).all() and h.item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 5)
    before = logits.clone()
    token_entropy(logits, exact_term=True)
    assert torch.equal(logits, before)                                     # input is never modified


def test_token_logprobs_shape_error():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and tokens \(2, 4\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_stats_is_the_two_functions_in_one_pass(dtype):
    b = random_batch(B=3, T=4, V=41, seed=6)
    logits = b["logits"].to(dtype)
    logp, h, s2 = logprobs.token_stats(logits, b["tokens"], chunk_size=5)
    h_ref, s2_ref = token_entropy(logits, exact_term=True, chunk_size=5)
    lp_ref = token_logprobs(logits, b["tokens"], chunk_size=5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logp, lp_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(s2, s2_ref, rtol=0, atol=0)
    assert not logp.requires_grad
    with pytest.raises(ValueError, match="disagree"):
        logprobs.token_stats(logits, b["tokens"][:, :2])



@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_entropy_gradient_equals_autograd_of_the_formula(dtype, tol, chunk):
    b = intervention_batch(B=3, T=4, V=29, seed=1)
    logits = b["logits"].to(dtype)
    logits[0, 0, :3] = -math.inf                                          # masked vocabulary entries
    logits.requires_grad_(True)
    w_lp, w_h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    logp, h = logprobs.token_logprobs_entropy(logits, b["tokens"], chunk_size=chunk)
    (g,) = torch.autograd.grad((logp * w_lp).sum() + (h * w_h).sum(), logits)
    ref = logits.detach().double().requires_grad_(True)
    h_ref, lsm = naive_entropy(ref)
    lp_ref = lsm.gather(-1, b["tokens"][..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((lp_ref * w_lp).sum() + (h_ref * w_h).sum(), ref)
    assert g.dtype == dtype and torch.isfinite(g).all() and (g[0, 0, :3] == 0).all()
    torch.testing.assert_close(h.double(), h_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(logp.double(), lp_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


def test_entropy_gradient_hand_value():
    # two tokens, logits (0, log 3): pi = (1/4, 3/4); dH/dz_b = -pi_b (log pi_b + H)
    z = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64, requires_grad=True)
    h = logprobs.policy_entropy(z)
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    H = -(p * p.log()).sum()
    (g,) = torch.autograd.grad(h.sum(), z)
    assert h.item() == pytest.approx(H.item(), rel=1e-14)
    torch.testing.assert_close(g[0], -p * (p.log() + H))
    assert g.sum().abs().item() < 1e-15                                   # softmax shift invariance
