"""Log-probabilities and entropies over the vocabulary, chunked: what losses.py's methods read from logits
(log pi of the sampled tokens; the behaviour policy's entropy H and S2 = sum_b pi_b^2 (log pi_b + H); the
current policy's H with its gradient), without ever holding float32 copies of (N, V) logits.

Each function walks the rows in chunks of CHUNK_BYTES of float32 and returns float32 (float64 for float64
logits); values equal a plain log_softmax to float precision (tests/test_logprobs.py). entropy_math.py derives
S2, the exact first-order entropy change's second term. The plain, unchunked versions, for a copier of
losses.py who wants no second file, are three lines (logits (..., V) at the sampling temperature):

    logp_all = logits.float().log_softmax(-1); p = logp_all.exp()
    H = -(p * logp_all).sum(-1); S2 = (p * p * (logp_all + H[..., None])).sum(-1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)

    from logprobs import token_logprobs, token_stats, token_logprobs_entropy
    old_logp, entropy, exact_term = token_stats(old_logits, tokens)     # no gradient, one pass
    logp = token_logprobs(logits, tokens)                                # with gradient
"""
import torch

CHUNK_BYTES = 8 * 2**20     # float32 bytes per work buffer (cache-sized)


def _acc(dtype):
    """Accumulation dtype: float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _rows_per_chunk(vocab, chunk_size):
    return chunk_size or max(1, CHUNK_BYTES // (4 * vocab))


def _row_chunks(flat, rows, n_buffers):
    """Yield (start, chunk, buffers) over row chunks of flat (N, V), with float work buffers reused.

    Reusing the buffers keeps the working set small (it stays in cache on a CPU) and avoids a fresh
    allocation, with its page faults, per chunk.
    """
    rows = max(1, min(rows, flat.shape[0]))                   # an empty batch: no chunk at all
    acc = _acc(flat.dtype)
    buffers = [torch.empty(rows, flat.shape[-1], dtype=acc, device=flat.device) for _ in range(n_buffers)]
    for s in range(0, flat.shape[0], rows):
        chunk = flat[s:s + rows]
        yield s, chunk, [b[:chunk.shape[0]] for b in buffers]


class _SampledLogProb(torch.autograd.Function):
    """log pi(a) = z_a - logsumexp(z), with the logsumexp taken over row chunks in float32.

    Only the logits (already alive) and the (N,) logsumexp are saved; the backward recomputes the
    softmax chunk by chunk: d log pi(a) / dz = e_a - softmax(z).
    """

    @staticmethod
    def forward(ctx, logits, tokens, rows):
        lse = torch.empty(logits.shape[0], dtype=_acc(logits.dtype), device=logits.device)
        for s, chunk, (z,) in _row_chunks(logits, rows, 1):
            z.copy_(chunk)
            top = z.amax(dim=-1, keepdim=True)
            lse[s:s + z.shape[0]] = z.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.rows = rows
        return logits.gather(-1, tokens[:, None]).squeeze(-1).to(lse.dtype) - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s, chunk, (p,) in _row_chunks(logits, ctx.rows, 1):
            n = chunk.shape[0]
            g = grad_out[s:s + n, None].to(p.dtype)
            p.copy_(chunk).sub_(lse[s:s + n, None]).exp_()                    # softmax(z)
            p.mul_(-g).scatter_add_(-1, tokens[s:s + n, None], g)              # g (e_a - softmax(z))
            grad[s:s + n] = p
        return grad, None, None


def token_logprobs(logits, tokens, *, chunk_size=None):
    """log pi(tokens) from logits, with gradient: gathered logit minus a chunked logsumexp.

    logits: (..., V) any float dtype; tokens: (...) long. Returns (...) float32 (float64 for float64
    logits). Never builds a full float32 log-softmax: the working set is one float32 chunk of
    `chunk_size` rows (default: CHUNK_BYTES worth), and the backward writes the logits' gradient chunk
    by chunk.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree; "
                         "expected logits (..., V) and tokens (...)")
    flat = logits.reshape(-1, logits.shape[-1])
    rows = _rows_per_chunk(flat.shape[-1], chunk_size)
    out = _SampledLogProb.apply(flat, tokens.reshape(-1), rows)
    return out.view(tokens.shape)


@torch.no_grad()
def _entropy_pass(flat, rows, exact_term, tokens=None):
    """One chunked pass over flat logits (N, V): H (N,), S2 (N,) or None, log pi(tokens) (N,) or None."""
    ent = torch.empty(flat.shape[0], dtype=_acc(flat.dtype), device=flat.device)
    s2 = torch.empty_like(ent) if exact_term else None
    logp = torch.empty_like(ent) if tokens is not None else None
    lowest = torch.finfo(ent.dtype).min
    for s, chunk, (z, e, t) in _row_chunks(flat, rows, 3):
        n = chunk.shape[0]
        z.copy_(chunk)
        z.sub_(z.amax(dim=-1, keepdim=True)).clamp_(min=lowest)            # shift; -inf -> finite
        torch.exp(z, out=e)                                                 # e = S pi
        total = e.sum(-1)
        log_total = total.log()
        h = log_total - torch.mul(e, z, out=t).sum(-1) / total              # H = log S - E_pi[z]
        ent[s:s + n] = h
        if tokens is not None:
            logp[s:s + n] = z.gather(-1, tokens[s:s + n, None]).squeeze(-1) - log_total   # z_a - log S
        if exact_term:
            sum_e2 = e.square_().sum(-1)
            sum_e2z = torch.mul(e, z, out=t).sum(-1)
            s2[s:s + n] = (sum_e2z - log_total * sum_e2 + h * sum_e2) / total.square()
    return ent, s2, logp


def token_entropy(logits, *, exact_term=False, chunk_size=None):
    """Full-vocabulary entropy per position, computed in float32 chunks, without gradient.

    logits: (..., V). Returns H (...) float32 (float64 for float64 logits):
        H = -sum_b pi_b log pi_b = log S - sum_b e_b z_b / S,  with z = logits - max, e = exp(z), S = sum e.
    With exact_term=True returns (H, S2) where S2 = sum_b pi_b^2 (log pi_b + H), the extra reduction that
    the exact first-order entropy change needs (entropy_math.dh_exact), from the same pass:
        S2 = (sum e^2 z - log S sum e^2) / S^2 + H sum e^2 / S^2.
    -inf logits (masked vocabulary entries) contribute exactly zero.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    ent, s2, _ = _entropy_pass(flat, _rows_per_chunk(flat.shape[-1], chunk_size), exact_term)
    shape = logits.shape[:-1]
    return (ent.view(shape), s2.view(shape)) if exact_term else ent.view(shape)


def token_stats(logits, tokens, *, chunk_size=None):
    """log pi(tokens), H and S2 per position in one chunked pass, without gradient: (logp, H, S2), each (...).

    logits: (..., V); tokens: (...) long. The same numbers as token_logprobs (detached) and
    token_entropy(exact_term=True), for the behaviour policy's statistics, at the cost of one pass.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree; "
                         "expected logits (..., V) and tokens (...)")
    flat = logits.reshape(-1, logits.shape[-1])
    ent, s2, logp = _entropy_pass(flat, _rows_per_chunk(flat.shape[-1], chunk_size), True, tokens.reshape(-1))
    return logp.view(tokens.shape), ent.view(tokens.shape), s2.view(tokens.shape)


class _LogProbEntropy(torch.autograd.Function):
    """(log pi(a), H) from logits (N, V), both with gradient, in float32 chunks (float64 for float64 logits).

    Forward: one pass; saves only the logits (already alive), the (N,) logsumexp and the (N,) entropy.
    Backward: recomputes the softmax chunk by chunk and writes the logits' gradient chunk by chunk,
        d log pi(a) / dz_b = 1[b = a] - pi_b,        dH / dz_b = -pi_b (log pi_b + H),
    so no (N, V) float32 tensor is ever held. A gradient that reaches only one output skips the other's term.
    """

    @staticmethod
    def forward(ctx, logits, tokens, rows):
        acc = _acc(logits.dtype)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        ent = torch.empty_like(lse)
        lowest = torch.finfo(acc).min
        for s, chunk, (z, e) in _row_chunks(logits, rows, 2):
            n = chunk.shape[0]
            z.copy_(chunk)
            top = z.amax(dim=-1, keepdim=True)
            z.sub_(top).clamp_(min=lowest)                                      # shift; -inf -> finite
            torch.exp(z, out=e)
            total = e.sum(-1)
            log_total = total.log()
            ent[s:s + n] = log_total - e.mul_(z).sum(-1) / total                 # H = log S - E_pi[z]
            lse[s:s + n] = log_total + top.squeeze(-1)
        ctx.save_for_backward(logits, tokens, lse, ent)
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        logp = logits.gather(-1, tokens[:, None]).squeeze(-1).to(acc) - lse
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, tokens, lse, ent = ctx.saved_tensors
        grad = torch.empty_like(logits)
        lowest = torch.finfo(lse.dtype).min
        for s, chunk, (lp, p) in _row_chunks(logits, ctx.rows, 2):
            n = chunk.shape[0]
            lp.copy_(chunk).sub_(lse[s:s + n, None]).clamp_(min=lowest)        # log pi_b
            torch.exp(lp, out=p)                                                # pi_b
            if g_ent is None:
                lp.zero_()
            else:                                                               # -g_H pi_b (log pi_b + H)
                lp.add_(ent[s:s + n, None]).mul_(p).mul_(-g_ent[s:s + n, None].to(lp.dtype))
            if g_logp is not None:                                              # + g (e_a - pi)
                g = g_logp[s:s + n, None].to(lp.dtype)
                lp.addcmul_(p, g, value=-1.0).scatter_add_(-1, tokens[s:s + n, None], g)
            grad[s:s + n] = lp
        return grad, None, None


def token_logprobs_entropy(logits, tokens, *, chunk_size=None):
    """log pi(tokens) and the full-vocabulary entropy H per position, both WITH gradient: (logp, H), each (...).

    logits: (..., V) any float dtype; tokens: (...) long. For the losses that need the current policy's
    entropy with its gradient (entropy_bonus_loss, adaptive_entropy_loss): one chunked pass forward and
    one backward for both outputs, so the working set is two float32 chunks of `chunk_size` rows (default
    CHUNK_BYTES worth) beyond the logits' own gradient. Returns float32 (float64 for float64 logits).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree; "
                         "expected logits (..., V) and tokens (...)")
    flat = logits.reshape(-1, logits.shape[-1])
    logp, ent = _LogProbEntropy.apply(flat, tokens.reshape(-1), _rows_per_chunk(flat.shape[-1], chunk_size))
    return logp.view(tokens.shape), ent.view(tokens.shape)


def policy_entropy(logits, *, chunk_size=None):
    """The full-vocabulary entropy H (...) of logits (..., V) WITH gradient, chunked as token_logprobs_entropy.

    token_entropy gives the same numbers without gradient (for the behaviour policy).
    """
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs_entropy(logits, tokens, chunk_size=chunk_size)[1]
