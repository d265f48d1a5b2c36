"""Reproduces the README's "why not higher / torchopt" facts, side by side with metafunc.

Run: ``pip install higher torchopt && python benchmarks/peer_facts.py``. Peers that are not
installed are skipped. Nothing here is part of the test suite (the peers are not dependencies).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import metafunc

warnings.filterwarnings("ignore")


def _zero_entry_unroll(update_fn):
    """Meta-gradient d(sum w_2)/d w_0 through 2 Adam steps where w's first gradient entry is 0."""
    w = torch.tensor([0.0, 1.0], requires_grad=True)
    mask = torch.tensor([0.0, 1.0])
    p = w
    state = None
    for _ in range(2):
        (g,) = torch.autograd.grad((mask * p**2).sum(), [p], create_graph=True)
        p, state = update_fn(p, g, state)
    return torch.autograd.grad(p.sum(), w)[0]


def _cubic(x, a):
    """torchopt#222: the real root of a x^3 - x - 2 at a = 1; dx/da = -0.5924469933, d2x/da2 =
    0.8451995734 (differentiate x = x(a) in a x^3 - x - 2 = 0 twice)."""
    return a * x**3 - x - 2


def _newton(x, a):
    x, a = x.detach(), a.detach()
    for _ in range(60):
        x = x - _cubic(x, a) / (3 * a * x**2 - 1)
    return x


def _root_derivatives(decorate, shape):
    """(dx/da, d2x/da2) of the decorated Newton solver, for a of the given shape."""
    root = decorate(_newton)
    a = torch.ones(shape, dtype=torch.float64, requires_grad=True)
    x = root(torch.ones(shape, dtype=torch.float64), a)
    (d,) = torch.autograd.grad(x.sum(), a, create_graph=True)
    (d2,) = torch.autograd.grad(d.sum(), a)
    return round(d.sum().item(), 10), round(d2.sum().item(), 10)


def metafunc_facts() -> None:
    opt = metafunc.optim.adam(lr=0.1)

    def step(p, g, state):
        state = opt.init({"w": p}) if state is None else state
        u, state = opt.update({"w": g}, state, {"w": p})
        return metafunc.apply_updates({"w": p}, u)["w"], state

    print("metafunc.optim.adam, zero-gradient entry: meta-grad =", _zero_entry_unroll(step))


def torchopt_facts() -> None:
    try:
        import torchopt
    except ImportError:
        print("torchopt not installed: skipped")
        return
    opt = torchopt.adam(lr=0.1)

    def step(p, g, state):
        state = opt.init((p,)) if state is None else state
        u, state = opt.update((g,), state, params=(p,), inplace=False)
        return torchopt.apply_updates((p,), u, inplace=False)[0], state

    version = torchopt.__version__
    print(f"torchopt {version} adam, zero-gradient entry: meta-grad =", _zero_entry_unroll(step))
    solvers = {
        "solve_cg": torchopt.linear_solve.solve_cg,
        "solve_normal_cg": torchopt.linear_solve.solve_normal_cg,
        "solve_inv": torchopt.linear_solve.solve_inv,
    }
    for name, make in solvers.items():
        for shape in ((), (1,)):
            decorate = torchopt.diff.implicit.custom_root(_cubic, argnums=1, solve=make())
            try:
                result = _root_derivatives(decorate, shape)
            except RuntimeError as e:
                result = f"error: {str(e).splitlines()[0][:70]}"
            print(
                f"torchopt custom_root({name}), cubic root, a of shape {shape}: (d, d2) =", result
            )


def higher_facts() -> None:
    try:
        import higher
    except ImportError:
        print("higher not installed: skipped")
        return
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1)) as (fnet, diffopt):
        diffopt.step(((fnet(x) - y) ** 2).mean())
        ((fnet(x) - y) ** 2).mean().backward()
    print(
        "higher 0.2.1 innerloop_ctx defaults: net.weight.grad after meta-backward =",
        net.weight.grad,
    )

    torch.manual_seed(0)
    net, ref = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    inner = torch.optim.Adam(net.parameters(), lr=0.1, eps=1e-3)
    oracle = torch.optim.Adam(ref.parameters(), lr=0.1, eps=1e-3)
    with higher.innerloop_ctx(net, inner) as (fnet, diffopt):
        for _ in range(20):
            diffopt.step(((fnet(x) - y) ** 2).mean())
            oracle.zero_grad()
            ((ref(x) - y) ** 2).mean().backward()
            oracle.step()
        drift = (next(iter(fnet.parameters())) - ref.weight).abs().max().item()
    print(f"higher 0.2.1 Adam vs torch.optim.Adam, 20 steps, eps=1e-3: max |diff| = {drift:.2e}")

    opt = metafunc.optim.adam(lr=0.1, eps=1e-3)
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 1)
    fm = metafunc.functionalize(ref)
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    state = opt.init(params)
    oracle = torch.optim.Adam(ref.parameters(), lr=0.1, eps=1e-3)
    for _ in range(20):
        grads = torch.func.grad(lambda p: ((fm(p, x) - y) ** 2).mean())(params)
        u, state = opt.update(grads, state, params)
        params = metafunc.apply_updates(params, u)
        oracle.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        oracle.step()
    drift = (params["weight"] - ref.weight).abs().max().item()
    print(f"metafunc.optim.adam vs torch.optim.Adam, same run: max |diff| = {drift:.2e}")


def metafunc_implicit_facts() -> None:
    from metafunc.implicit import custom_root, solve_cg, solve_dense, solve_neumann

    solvers = {
        "solve_normal_cg (default)": None,
        "solve_cg": solve_cg,
        "solve_dense": solve_dense,
        "solve_neumann(alpha=0.1)": lambda m, b: solve_neumann(m, b, alpha=0.1, maxiter=1000),
    }
    for name, solve in solvers.items():
        for shape in ((), (1,)):
            decorate = custom_root(_cubic) if solve is None else custom_root(_cubic, solve)
            result = _root_derivatives(decorate, shape)
            print(
                f"metafunc custom_root({name}), cubic root, a of shape {shape}: (d, d2) =", result
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="accepted for uniformity: the full run takes seconds"
    )
    parser.parse_args()
    metafunc_facts()
    torchopt_facts()
    higher_facts()
    metafunc_implicit_facts()
