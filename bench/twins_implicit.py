"""PyTorch twins of bench_neumann_K20.c, bench_cg_K20.c (bench/implicit_bench.h)
and bench_maml_sinusoid*.c: the same shapes, distributions, algebra and
order of operations, written the way a PyTorch user would (torch.autograd.grad
with create_graph=True once, grad_outputs per product; MAML three ways:
per-task loop, functorch.vmap(grad), hand-batched autograd with bmm).

bench/torch_twins.py calls register(workload) so these appear next to its
own twins; run one with

    /usr/bin/python3 bench/torch_twins.py --workload neumann_K20 --threads 1
"""

import math

from twins_mlp import B, IN, OUT, SECOND_GEMMS, V, grad_gemms, nll, weights_and_decay
from twins_mlp import floor as _floor

# --------------------------------------------------------------- implicit (implicit_bench.h)
K = 20

# The GEMMs of implicit_bench.h's ib_floor: L_val's gradient at 512,
# L_train's at 128, and 8 per product for the backward through the
# recorded gradient.
IMPLICIT_GEMMS = grad_gemms(V) + grad_gemms(B) + SECOND_GEMMS * K


def _implicit_data(torch):
    """As ib_init: N(0,1) inputs, He-initialised W (layout [in, out]),
    uniform labels, lam ~ U[1e-4, 1e-3] shaped like W."""
    g = torch.Generator().manual_seed(42)
    x = torch.randn(B, IN, generator=g)
    xv = torch.randn(V, IN, generator=g)
    y = torch.randint(0, OUT, (B,), generator=g)
    yv = torch.randint(0, OUT, (V,), generator=g)
    w, lam = weights_and_decay(torch, g)
    return x, xv, y, yv, w, lam


def _implicit(method):
    import torch

    x, xv, y, yv, w, lam = _implicit_data(torch)
    grad = torch.autograd.grad
    alpha, damping = 0.1, 1.0

    def setup():
        # b = grad_w L_val (lam does not enter L_val: its direct part is 0),
        # g = grad_w L_eff recorded, L_eff = L_train + sum lam/2 w^2.
        b = grad(nll(torch, xv, w, yv), w)
        lt = nll(torch, x, w, y) + 0.5 * ((lam[0] * w[0] * w[0]).sum() +
                                           (lam[1] * w[1] * w[1]).sum())
        g = grad(lt, w, create_graph=True)
        return b, g

    def hvp(g, v):
        return grad(g, w, grad_outputs=v, retain_graph=True)

    def finish(g, v):
        mixed = grad(g, lam, grad_outputs=v)
        return [-m for m in mixed]

    def neumann():
        b, g = setup()
        with torch.no_grad():
            q = [bi.clone() for bi in b]
            v = [bi.clone() for bi in b]
        for _ in range(K):
            hq = hvp(g, q)
            with torch.no_grad():
                for qi, hi, vi in zip(q, hq, v):
                    qi.add_(hi, alpha=-alpha)
                    vi.add_(qi)
        with torch.no_grad():
            for vi in v:
                vi.mul_(alpha)
        return finish(g, v)

    def dot(a, b):
        return sum(float((ai * bi).sum()) for ai, bi in zip(a, b))

    def cg():
        b, g = setup()
        with torch.no_grad():
            v = [torch.zeros_like(bi) for bi in b]
            r = [bi.clone() for bi in b]
            p = [bi.clone() for bi in b]
            rs = dot(r, r)
        for _ in range(K):
            ap = hvp(g, p)
            with torch.no_grad():
                for api, pi in zip(ap, p):
                    api.add_(pi, alpha=damping)
                a = rs / dot(p, ap)
                for vi, ri, pi, api in zip(v, r, p, ap):
                    vi.add_(pi, alpha=a)
                    ri.add_(api, alpha=-a)
                rs_new = dot(r, r)
                for pi, ri in zip(p, r):
                    pi.mul_(rs_new / rs).add_(ri)
                rs = rs_new
        return finish(g, v)

    step = neumann if method == "neumann" else cg
    return step, _floor(torch, IMPLICIT_GEMMS)


# --------------------------------------------------------------- MAML (bench/maml_bench.h)
MK, MH = 10, 40


def _maml_gemms(n_tasks):
    k, h = MK, MH
    one_pass = [(k, h, 1, 0, 0), (k, h, h, 0, 0), (k, 1, h, 0, 0), (h, 1, k, 1, 0),
                (k, h, 1, 0, 1), (h, h, k, 1, 0), (k, h, h, 0, 1), (1, h, k, 1, 0)]
    second = [(k, 1, h, 0, 0), (k, h, 1, 0, 0), (k, 1, h, 0, 0), (1, h, k, 1, 0),
              (k, h, h, 0, 0), (k, h, h, 0, 1), (k, h, h, 0, 0), (h, h, k, 1, 0),
              (k, h, 1, 0, 0),
              (h, 1, k, 1, 0), (k, h, 1, 0, 1), (h, h, k, 1, 0), (k, h, h, 0, 1),
              (1, h, k, 1, 0)]
    return (one_pass * 2 + second) * n_tasks


# The three ways a PyTorch user writes a MAML meta-gradient; bench/run.py
# runs each and keeps the fastest.
MAML_VARIANTS = ("loop", "vmap", "batched")


def maml_sinusoid(n_tasks, variant):
    import torch

    F = torch.nn.functional
    g = torch.Generator().manual_seed(42)
    # Tasks as ds_sine_task_*: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].
    tasks = []
    for _ in range(n_tasks):
        amp = 0.1 + 4.9 * float(torch.rand(1, generator=g))
        ph = math.pi * float(torch.rand(1, generator=g))
        xs = torch.rand(MK, 1, generator=g) * 10 - 5
        xq = torch.rand(MK, 1, generator=g) * 10 - 5
        tasks.append((xs, amp * torch.sin(xs + ph), xq, amp * torch.sin(xq + ph)))
    shapes = [(1, MH), (MH,), (MH, MH), (MH,), (MH, 1), (1,)]
    theta = []
    for s in shapes:
        if len(s) == 2:
            bound = 1.0 / math.sqrt(s[0])
            theta.append(((torch.rand(*s, generator=g) * 2 - 1) * bound).requires_grad_())
        else:
            theta.append(torch.zeros(*s, requires_grad=True))
    alpha = 0.01
    grad = torch.autograd.grad

    def net(p, x):
        h = torch.relu(x @ p[0] + p[1])
        h = torch.relu(h @ p[2] + p[3])
        return h @ p[4] + p[5]

    def loop():
        # The usual functional MAML: one create_graph grad per task.
        total = 0.0
        for xs, ys, xq, yq in tasks:
            gs = grad(F.mse_loss(net(theta, xs), ys), theta, create_graph=True)
            phi = [p - alpha * gi for p, gi in zip(theta, gs)]
            total = total + F.mse_loss(net(phi, xq), yq)
        grad(total / n_tasks, theta)

    XS = torch.stack([t[0] for t in tasks])  # [T, K, 1]
    YS = torch.stack([t[1] for t in tasks])
    XQ = torch.stack([t[2] for t in tasks])
    YQ = torch.stack([t[3] for t in tasks])

    if variant == "vmap":
        import functorch

        def inner(p, xs, ys):
            return F.mse_loss(net(p, xs), ys)

        def task_loss(p, xs, ys, xq, yq):
            gs = functorch.grad(inner)(p, xs, ys)
            phi = tuple(pi - alpha * gi for pi, gi in zip(p, gs))
            return F.mse_loss(net(phi, xq), yq)

        per_task = functorch.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
        params = tuple(theta)

        def step():
            grad(per_task(params, XS, YS, XQ, YQ).mean(), theta)

    elif variant == "batched":
        # Every task at once with bmm: theta copied per task (so autograd
        # gives each task its own inner gradient), the inner step on the
        # copies, the mean query loss differentiated back to theta.
        def bnet(p, x):
            h = torch.relu(torch.baddbmm(p[1].unsqueeze(1), x, p[0]))
            h = torch.relu(torch.baddbmm(p[3].unsqueeze(1), h, p[2]))
            return torch.baddbmm(p[5].unsqueeze(1), h, p[4])

        def step():
            tb = [p.unsqueeze(0).expand(n_tasks, *p.shape).clone() for p in theta]
            inner = ((bnet(tb, XS) - YS) ** 2).mean(dim=(1, 2)).sum()
            gs = grad(inner, tb, create_graph=True)
            phi = [p - alpha * gi for p, gi in zip(tb, gs)]
            grad(((bnet(phi, XQ) - YQ) ** 2).mean(), theta)

    else:
        step = loop
    return step, _floor(torch, _maml_gemms(n_tasks))


def register(workload):
    """Adds the twins to bench/torch_twins.py's table."""
    workload("neumann_K20")(lambda: _implicit("neumann"))
    workload("cg_K20")(lambda: _implicit("cg"))
    for n_tasks, name in ((25, "maml_sinusoid"), (100, "maml_sinusoid_100")):
        fn = workload(name)(lambda variant="loop", n=n_tasks: maml_sinusoid(n, variant))
        fn.variants = MAML_VARIANTS
