"""What the PyTorch twins of the 784-200-10 MLP benches share (bench/mlp.h,
bench/implicit_bench.h, bench/unroll_bench.h, bench/hg_mlp.h): the shapes,
the loss, He-initialised weights with a per-weight decay, and the floor (the
same GEMMs as the C side's ad_gemm_f32 calls, through torch.mm).

Imported by bench/torch_twins.py, bench/twins_implicit.py and
bench/twins_unroll.py (bench/ is sys.path[0] when any of them runs)."""

import math

B, V, IN, H, OUT = 128, 512, 784, 200, 10


def grad_gemms(n):
    """The 5 GEMMs of forward + gradient on n rows, (m, n, k, trans_a, trans_b)."""
    return [
        (n, H, IN, 0, 0),  # H = X W1
        (n, OUT, H, 0, 0),  # Z = A W2
        (H, OUT, n, 1, 0),  # dW2 = A^T G
        (n, H, OUT, 0, 1),  # dA = G W2^T
        (IN, H, n, 1, 0),  # dW1 = X^T dH
    ]


# The 8 GEMMs of one backward through a recorded gradient at batch B.
SECOND_GEMMS = [
    (B, H, IN, 0, 0),  # X V1
    (B, H, OUT, 0, 1),  # G V2^T
    (B, OUT, H, 0, 0),  # A V2
    (B, OUT, H, 0, 0),  # bdA W2
    (H, OUT, B, 1, 0),  # bdA^T G
    (H, OUT, B, 1, 0),  # A^T bZ
    (B, H, OUT, 0, 1),  # bZ W2^T
    (IN, H, B, 1, 0),  # X^T bH
]


def mm_buffers(torch, shapes):
    """Inputs for the floor GEMMs: (m, n, k, trans_a, trans_b) -> (A, B, C)
    with op(A) m x k and op(B) k x n given as transposed views when asked,
    exactly like the row-major strides the C side passes to BLIS."""
    out = []
    for m, n, k, ta, tb in shapes:
        a = torch.randn(k, m).t() if ta else torch.randn(m, k)
        b = torch.randn(n, k).t() if tb else torch.randn(k, n)
        out.append((a, b, torch.empty(m, n)))
    return out


def floor(torch, shapes):
    """A function running the GEMMs `shapes` once, on buffers made now."""
    bufs = mm_buffers(torch, shapes)
    mm = torch.mm

    def run():
        for a, b, c in bufs:
            mm(a, b, out=c)

    return run


def nll(torch, x, w, y):
    """Mean NLL of log_softmax(relu(x W1) W2) (layout [in, out], no biases)."""
    F = torch.nn.functional
    return F.nll_loss(F.log_softmax(torch.relu(x @ w[0]) @ w[1], dim=1), y)


def weights_and_decay(torch, g):
    """He-initialised W1, W2 (layout [in, out]) and lam ~ U[1e-4, 1e-3]
    shaped like them, all leaves, drawn from g in this order."""
    w1 = (torch.randn(IN, H, generator=g) * math.sqrt(2.0 / IN)).requires_grad_()
    w2 = (torch.randn(H, OUT, generator=g) * math.sqrt(2.0 / H)).requires_grad_()
    l1 = (torch.rand(IN, H, generator=g) * 9e-4 + 1e-4).requires_grad_()
    l2 = (torch.rand(H, OUT, generator=g) * 9e-4 + 1e-4).requires_grad_()
    return (w1, w2), (l1, l2)
