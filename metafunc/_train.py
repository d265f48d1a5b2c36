"""``python -m metafunc train``: meta-train, evaluate, checkpoint and report an algorithm on a task.

Every run writes to ``--out`` (default ``runs/<algorithm>-<task>-seed<seed>``): ``checkpoint.pt``
(resumable exactly with ``--resume``), ``results.json`` and ``training.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
from torch import nn

import metafunc

from . import algorithms, data, distributed, implicit

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "mamlpp", "reptile", "imaml", "leap", "warpgrad")
TASKS = ("sinusoid", "glyphs", "omniglot")
_Z95 = 1.959963984540054
# the fixed val/test tasks' generator seeds: far from the small --seed values people use, so that
# sinusoid's held-out tasks never come from the training tasks' stream (there is no class split)
_VAL_SEED, _TEST_SEED = 2_000_000_011, 2_000_000_029
# flags that a resumed run must share with its checkpoint (they decide the run or its test tasks)
_RESUME_KEYS = (
    "algorithm", "task", "seed", "meta_batch", "inner_steps", "inner_lr", "outer_lr",
    "first_order", "lam", "cg_steps", "shots", "queries", "ways", "hidden", "classes", "data_seed",
    "eval_tasks",
)  # fmt: skip


# ------------------------------------------------------------------------------------- models
def _mlp(warp: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(1, 40), nn.ReLU()]
    if warp:  # WarpGrad: warp layers between the task layers, never adapted
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 40), nn.ReLU()]
    if warp:
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 1)]
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The 4-block few-shot conv net (Vinyals et al. 2016): conv3x3-BatchNorm-ReLU-maxpool blocks
    and a linear head; with ``warp=True`` a warp conv (3x3, never adapted) follows blocks 1-3."""

    def __init__(self, ways: int, hidden: int = 32, image_size: int = 28, warp: bool = False):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 1
        for i in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden, 3, padding=1),
                    nn.BatchNorm2d(hidden, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
            )
            if warp and i < 3:
                blocks.append(nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU()))
            channels = hidden
        self.features = nn.Sequential(*blocks)
        size = image_size
        for _ in range(4):
            size //= 2
        self.head = nn.Linear(hidden * max(size, 1) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _warp_names(model: nn.Module, task: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if task == "sinusoid":
        return [n for n in names if n.split(".")[0] in ("2", "6")]
    warp_blocks = {str(i) for i in (1, 3, 5)}  # features.<i> are the warp blocks
    return [n for n in names if n.startswith("features.") and n.split(".")[1] in warp_blocks]


def _head_names(model: nn.Module, task: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    last = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == last]


# -------------------------------------------------------------------------------------- tasks
class Tasks:
    """Samples meta-batches from the train/val/test splits of a task family."""

    def __init__(self, args: argparse.Namespace):
        self.kind = args.task
        self.shots, self.queries = args.shots, args.queries
        if args.task == "sinusoid":
            self.sinusoid = data.Sinusoid()
            self.loss = "mse"
            return
        self.loss = "cross_entropy"
        if args.task == "glyphs":
            dataset = data.procedural_glyphs(args.classes, 20, seed=args.data_seed)
            sizes: Any = (0.64, 0.16, 0.2)
        else:
            if args.data_path is None:
                raise SystemExit(
                    "python -m metafunc train: --task omniglot needs --data-path, the folder that "
                    "holds images_background/ and images_evaluation/ (or one of them). There is "
                    "no download; use --task glyphs for a built-in image task."
                )
            try:
                dataset = data.load_omniglot(args.data_path)
            except (OSError, ValueError, ImportError) as e:
                raise SystemExit(
                    f"python -m metafunc train: --data-path {args.data_path}: {e}"
                ) from None
            # Vinyals et al. 2016: 1200 characters for meta-training (here 1100 + 100 for
            # validation), the rest for testing; a character's rotations stay together
            n_chars = len(set(dataset.class_groups or range(dataset.num_classes)))
            sizes = (1100, 100, None) if n_chars > 1300 else (0.6, 0.1, 0.3)
        splits = data.split_classes(dataset, sizes, seed=args.data_seed)
        self.samplers = {}
        for name, classes in zip(("train", "val", "test"), splits):
            try:
                self.samplers[name] = data.EpisodeSampler(
                    dataset, classes, ways=args.ways, shots=args.shots, queries=args.queries
                )
            except ValueError as e:
                more = "raise --classes" if args.task == "glyphs" else "use more characters"
                raise SystemExit(
                    f"python -m metafunc train: the meta-{name} split has {len(classes)} of the "
                    f"{dataset.num_classes} classes and cannot give --ways {args.ways} --shots "
                    f"{args.shots} --queries {args.queries} episodes ({e}). Lower --ways, "
                    f"--shots or --queries, or {more}."
                ) from None

    def sample(self, split: str, n: int, generator: torch.Generator, device) -> data.Episode:
        if self.kind == "sinusoid":
            return self.sinusoid.sample(
                n, self.shots, self.queries, generator=generator, device=device
            )
        return self.samplers[split].sample(n, generator=generator, device=device)


# ---------------------------------------------------------------------------------- learners
def _learner(args: argparse.Namespace, fm, model: nn.Module, loss: str, strategy: str):
    common: dict[str, Any] = {"strategy": strategy}
    a = args.algorithm
    if a in ("maml", "fomaml", "metasgd", "anil", "mamlpp"):
        kwargs: dict[str, Any] = {
            "inner_lr": args.inner_lr,
            "steps": args.inner_steps,
            "first_order": args.first_order or a == "fomaml",
        }
        if a == "metasgd":
            kwargs["learn_lr"] = "per_param"
        if a == "anil":
            kwargs["adapt"] = _head_names(model, args.task)
        if a == "mamlpp":
            kwargs["learn_lr"] = "per_layer_per_step"
            kwargs["step_weights"] = _msl_weights(args.inner_steps, 0.0)
        return algorithms.MAML(fm, loss, **kwargs, **common)
    if a == "reptile":
        return algorithms.Reptile(
            fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, **common
        )
    if a == "imaml":
        return algorithms.IMAML(
            fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, lam=args.lam,
            solve=functools.partial(implicit.solve_cg, maxiter=args.cg_steps),
            if_not_converged="ignore", **common,
        )  # fmt: skip
    if a == "leap":
        return algorithms.Leap(fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, **common)
    return algorithms.WarpGrad(
        fm, loss, warp=_warp_names(model, args.task), inner_lr=args.inner_lr,
        steps=args.inner_steps, seed=args.seed,
        buffer_size=1000 if args.task == "sinusoid" else 200, **common,
    )  # fmt: skip


def _msl_weights(steps: int, progress: float) -> list[float]:
    """MAML++'s multi-step loss: from uniform weights to the last step only, over ``progress``."""
    a = min(max(progress, 0.0), 1.0)
    w = [(1 - a) / steps] * steps
    w[-1] += a
    return w


# ------------------------------------------------------------------------------- reporting
class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.t0, self.last_draw, self.last_decile = time.perf_counter(), 0.0, -1

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = 10 * step // self.total
        if self.tty and (now - self.last_draw > 0.2 or step == self.total):
            done = int(30 * step / self.total)
            rate = (step - self.start_step) / max(now - self.t0, 1e-9)
            bar = "#" * done + "." * (30 - done)
            sys.stderr.write(f"\r[{bar}] {step}/{self.total} {text} {rate:.1f} it/s ")
            sys.stderr.flush()
            self.last_draw = now
        elif not self.tty and decile != self.last_decile:
            sys.stderr.write(f"step {step}/{self.total} {text}\n")
            self.last_decile = decile
        if step == self.total and self.tty:
            sys.stderr.write("\n")


def _summary(values: torch.Tensor) -> dict[str, float]:
    values = values.double().cpu()
    n = values.numel()
    mean = values.mean().item()
    half = _Z95 * values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "n": n}


def _evaluate(learner, meta, tasks: Tasks, split: str, n: int, seed: int, device, chunk: int):
    """Post-adaptation query metrics on ``n`` fixed tasks of ``split`` (same tasks every time)."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    left = n
    while left > 0:
        k = min(chunk, left)
        episode = tasks.sample(split, k, generator, device)
        # under torchrun each process adapts to its share of the tasks; all get every metric
        metrics = distributed.evaluate(learner, meta, episode.support, episode.query)
        for key, value in metrics.items():
            parts.setdefault(key, []).append(value.detach())
        left -= k
    return {key: torch.cat(v) for key, v in parts.items()}


def _plot(path: Path, history: dict, learner, meta, tasks: Tasks, device, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sinusoid = tasks.kind == "sinusoid"
    fig, axes = plt.subplots(1, 2 if sinusoid else 1, figsize=(11 if sinusoid else 6, 4))
    ax = axes[0] if sinusoid else axes
    ax.plot(history["step"], history["meta_loss"], lw=0.8, label="meta-loss (train, smoothed)")
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="post-adaptation val loss")
    ax.set_xlabel("meta-step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    if sinusoid:
        ax = axes[1]
        generator = torch.Generator().manual_seed(_TEST_SEED)
        episode = tasks.sample("test", 1, generator, device)
        x = torch.linspace(-5, 5, 200, device=device).reshape(1, -1, 1)
        params = learner.adapt(optree.tree_map(lambda t: t[0], _task0(meta)), _first(episode))
        init = {k: v.detach() for k, v in meta["params"].items()}
        truth = data.Sinusoid.evaluate(x, **episode.info)
        with torch.no_grad():
            before = learner.model(init, x[0])
            after = learner.model(params, x[0])
        xs = x[0, :, 0].cpu()
        ax.plot(xs, truth[0, :, 0].cpu(), "k-", label="true function")
        ax.plot(xs, before[:, 0].cpu(), "--", label="meta-learned init")
        ax.plot(xs, after[:, 0].cpu(), label="after adaptation")
        sx, sy = episode.support
        ax.plot(sx[0, :, 0].cpu(), sy[0, :, 0].cpu(), "^", label=f"{tasks.shots} support points")
        ax.set_title("a held-out task")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _task0(meta):
    return optree.tree_map(lambda t: t.detach().unsqueeze(0), meta)


def _first(episode: data.Episode):
    x, y = episode.support
    return x[0], y[0]


# ------------------------------------------------------------------------------ checkpoints
def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash never leaves half a checkpoint


def _choose_strategy(args, fm, model, tasks, device) -> str:
    if args.strategy != "auto":
        return args.strategy
    if device.type != "cpu" or args.compile:  # a compiled loop would unroll every task
        return "vmap"
    probe = _learner(args, fm, model, tasks.loss, "auto")
    meta = probe.init()
    generator = torch.Generator().manual_seed(10**6 + args.seed)
    rng = torch.get_rng_state()
    share = -(-args.meta_batch // distributed.world_size())  # the largest share of a process
    for _ in range(6):  # vmap_tasks(strategy="auto") times loop and vmap three times each
        episode = tasks.sample("train", share, generator, device)
        probe.meta_grad(meta, episode.support, episode.query)
    torch.set_rng_state(rng)
    chosen = [m.strategy for m in probe._maps.values() if getattr(m, "strategy", None)]
    return chosen[0] if chosen else "vmap"


# -------------------------------------------------------------------------------------- run
def _launched_processes() -> int:
    """How many processes ``torchrun`` started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(args: argparse.Namespace) -> torch.device:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA);
    each CUDA process takes the device of its LOCAL_RANK."""
    device = torch.device(args.device)
    if _launched_processes() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not distributed.is_initialized():  # a caller may have made the group already
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _init_distributed(args)
    main_process = distributed.rank() == 0
    out = Path(args.out or f"runs/{args.algorithm}-{args.task}-seed{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    tasks = Tasks(args)
    warp = args.algorithm == "warpgrad"
    if args.task == "sinusoid":
        model: nn.Module = _mlp(warp)
    else:
        model = ConvNet(args.ways, args.hidden, warp=warp)
    model = model.to(device)
    fm = metafunc.functionalize(model)
    resumed = None
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(
                f"python -m metafunc train --resume: no checkpoint at {ckpt_path}. Run without "
                "--resume first, or point --out at the run's folder."
            )
        # on the CPU: RNG states must stay there; the parameters and Adam's state are copied
        # to the device below
        resumed = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in _RESUME_KEYS:
            if resumed["args"].get(key) != getattr(args, key):
                raise SystemExit(
                    f"python -m metafunc train --resume: the checkpoint was made with "
                    f"{_flag(key, resumed['args'].get(key))}, this run asks for "
                    f"{_flag(key, getattr(args, key))}. Resume with the same settings, or "
                    "start a new run in another --out."
                )
        if args.strategy not in ("auto", resumed["strategy"]):
            raise SystemExit(
                f"python -m metafunc train --resume: the checkpoint was made with --strategy "
                f"{resumed['strategy']}, this run asks for --strategy {args.strategy}. Resume "
                f"with --strategy {resumed['strategy']} (or auto)."
            )
        if resumed["step"] > args.steps:
            raise SystemExit(
                f"python -m metafunc train --resume: the checkpoint is at step "
                f"{resumed['step']}, past --steps {args.steps}. Pass --steps {resumed['step']} "
                "or more."
            )
        strategy = resumed["strategy"]
    else:
        if distributed.world_size() == 1:
            strategy = _choose_strategy(args, fm, model, tasks, device)
        else:  # rank 0 times one process's share alone; every process runs its pick
            chosen = [_choose_strategy(args, fm, model, tasks, device) if main_process else None]
            torch.distributed.broadcast_object_list(chosen, src=0)
            strategy = chosen[0]
    learner = _learner(args, fm, model, tasks.loss, strategy)
    if args.compile:
        # compiled on first use; MAML++'s annealed step weights are a tensor input, no recompiles
        learner.meta_grad = torch.compile(learner.meta_grad, backend=args.compile)
    meta = learner.init()
    leaves = optree.tree_leaves(meta)
    outer = torch.optim.Adam(leaves, lr=args.outer_lr)
    generator = torch.Generator().manual_seed(args.seed)
    history: dict[str, list] = {"step": [], "meta_loss": [], "val_step": [], "val_loss": []}
    if args.task != "sinusoid":
        history["val_accuracy"] = []
    start, seconds, smooth = 0, 0.0, None
    if resumed is not None:
        with torch.no_grad():
            for leaf, value in zip(leaves, resumed["meta"]):
                leaf.copy_(value)
        outer.load_state_dict(resumed["outer"])
        generator.set_state(resumed["generator"])
        torch.set_rng_state(resumed["torch_rng"])
        if hasattr(learner, "load_state_dict"):  # WarpGrad: one replay buffer per process
            states = resumed["learner"]
            if len(states) != distributed.world_size():
                raise SystemExit(
                    f"python -m metafunc train --resume: the checkpoint holds {len(states)} "
                    f"per-process {args.algorithm} states (replay buffers), this run has "
                    f"{distributed.world_size()} processes. Resume with the same number of "
                    "processes."
                )
            learner.load_state_dict(states[distributed.rank()])
        history, start, seconds, smooth = (
            resumed["history"],
            resumed["step"],
            resumed["seconds"],
            resumed["smooth"],
        )
    before = None
    if start == 0:
        before = _evaluate(learner, meta, tasks, "test", args.eval_tasks, _TEST_SEED, device, 100)
    else:
        before = resumed["before"] if resumed else None
    progress = Progress(args.steps, start, enabled=not args.quiet and main_process)
    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        states = None
        if hasattr(learner, "state_dict"):  # per-process state (WarpGrad's replay buffer)
            state = learner.state_dict()
            states = [state]
            if distributed.world_size() > 1:
                states = [None] * distributed.world_size()
                torch.distributed.all_gather_object(states, state)
        if not main_process:  # one writer; the others hold the same parameters
            return
        payload = {
            "args": vars(args),
            "step": step,
            "strategy": strategy,
            "meta": [leaf.detach().clone() for leaf in leaves],
            "outer": outer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "learner": states,
            "history": history,
            "seconds": seconds + time.perf_counter() - t0,
            "smooth": smooth,
            "before": before,
        }
        _save(ckpt_path, payload)

    val_text = ""
    for step in range(start + 1, args.steps + 1):
        if args.algorithm == "mamlpp":  # anneal the multi-step loss over the first quarter
            learner.step_weights = _msl_weights(args.inner_steps, step / (0.25 * args.steps))
        episode = tasks.sample("train", args.meta_batch, generator, device)
        # one process: learner.meta_grad; under torchrun each process takes its share of the
        # tasks and the task-weighted mean is all-reduced (metafunc.distributed)
        grads, metrics = distributed.meta_grad(learner, meta, episode.support, episode.query)
        for leaf, g in zip(leaves, optree.tree_leaves(grads)):
            leaf.grad = g
        outer.step()
        loss = metrics["loss"].mean().item()
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        history["step"].append(step)
        history["meta_loss"].append(smooth)
        if step % args.eval_every == 0 or step == args.steps:
            val = _evaluate(learner, meta, tasks, "val", args.val_tasks, _VAL_SEED, device, 100)
            history["val_step"].append(step)
            history["val_loss"].append(val["loss"].mean().item())
            val_text = f"val loss {history['val_loss'][-1]:.3f}"
            if "accuracy" in val:
                history["val_accuracy"].append(val["accuracy"].mean().item())
                val_text += f" acc {history['val_accuracy'][-1]:.3f}"
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint(step)
        progress.update(step, f"meta-loss {smooth:.3f} {val_text}")
    seconds += time.perf_counter() - t0
    final = _evaluate(learner, meta, tasks, "test", args.eval_tasks, _TEST_SEED, device, 100)
    results: dict[str, Any] = {
        "algorithm": args.algorithm,
        "task": args.task,
        "config": vars(args),
        "strategy": strategy,
        "device": str(device),
        "processes": distributed.world_size(),
        "versions": {
            "metafunc": metafunc.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "meta_steps": args.steps,
        "train_seconds": seconds,
        "test_before": {k: _summary(v) for k, v in (before or {}).items()},
        "test_after": {k: _summary(v) for k, v in final.items()},
        "history": history,
    }
    if not main_process:
        return results
    (out / "results.json").write_text(json.dumps(results, indent=1))
    title = f"{args.algorithm} on {args.task}"
    plotted = not args.no_plot and _plot(
        out / "training.png", history, learner, meta, tasks, device, title
    )
    if not args.quiet:
        _print_table(results, out, plotted)
    return results


def _flag(key: str, value: Any) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    return f"{name} {value}"


def _print_table(results: dict, out: Path, plotted: bool) -> None:
    n = results["test_after"]["loss"]["n"]
    print(f"\n{results['algorithm']} on {results['task']}: {results['meta_steps']} meta-steps in "
          f"{results['train_seconds']:.1f} s ({results['strategy']} over tasks, "
          f"{results['device']})")  # fmt: skip
    print(f"post-adaptation on {n} held-out test tasks (mean +- 95 % CI):")
    print(f"  {'metric':<10} {'before meta-training':>24} {'after':>24}")
    for key, after in results["test_after"].items():
        b = results["test_before"].get(key)
        before = f"{b['mean']:.4f} +- {b['ci95']:.4f}" if b else "-"
        now = f"{after['mean']:.4f} +- {after['ci95']:.4f}"
        print(f"  {key:<10} {before:>24} {now:>24}")
    print(f"results: {out / 'results.json'}; checkpoint: {out / 'checkpoint.pt'}", end="")
    print(f"; plot: {out / 'training.png'}" if plotted else "")


# ----------------------------------------------------------------------------------- parser
def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    noun = "integer" if kind is int else "finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}") from None
        if not 0 < value < math.inf:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metafunc train",
        description="Meta-train an algorithm on a task family, evaluate it on held-out tasks, "
        "and write a checkpoint, results.json and a plot.",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS, default="maml")
    p.add_argument("--task", choices=TASKS, default="sinusoid")
    p.add_argument("--steps", type=_positive(int), default=10000, help="meta-training steps")
    p.add_argument("--meta-batch", type=_positive(int), default=None, help="tasks per step")
    p.add_argument("--inner-steps", type=_positive(int), default=None)
    p.add_argument("--inner-lr", type=_positive(float), default=None)
    p.add_argument("--outer-lr", type=_positive(float), default=1e-3)
    # flags that apply to some algorithms or tasks only default to None here (a given flag that
    # does not apply is an error) and get their defaults (_SCOPED) in parse()
    p.add_argument(
        "--first-order", action="store_true", default=None, help="first-order meta-gradient"
    )
    p.add_argument("--lam", type=_positive(float), help="iMAML's proximal strength (2.0)")
    p.add_argument("--cg-steps", type=_positive(int), help="iMAML's conjugate-gradient steps (5)")
    p.add_argument("--shots", type=_positive(int), default=None, help="support examples")
    p.add_argument("--queries", type=_positive(int), default=None, help="query examples")
    p.add_argument("--ways", type=_positive(int), help="classes per episode (images; 5)")
    p.add_argument("--hidden", type=_positive(int), help="conv channels (images; 32)")
    p.add_argument("--classes", type=_positive(int), help="glyph classes (300)")
    p.add_argument("--data-path", default=None, help="Omniglot folder (no download)")
    p.add_argument("--data-seed", type=int, help="class split and glyph seed (images; 0)")
    p.add_argument("--eval-every", type=_positive(int), default=500)
    p.add_argument("--val-tasks", type=_positive(int), default=100)
    p.add_argument("--eval-tasks", type=_positive(int), default=600)
    p.add_argument("--checkpoint-every", type=_positive(int), default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, ... (under torchrun: cuda:LOCAL_RANK)"
    )
    p.add_argument("--strategy", choices=("auto", "vmap", "loop"), default="auto")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="run the meta-step through torch.compile (backend inductor unless named, e.g. "
        "aot_eager); with --strategy auto the tasks are vmapped",
    )
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


_DEFAULTS = {  # per task family: (meta_batch, shots, queries, inner_steps, inner_lr)
    "sinusoid": (25, 10, 10, 1, 0.01),
    "image": (16, 1, 15, 1, 0.4),
}


_MAML_FAMILY = ("maml", "fomaml", "metasgd", "anil", "mamlpp")
# flag: (default, the algorithms or tasks it applies to, "algorithm" or "task")
_SCOPED: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "first_order": (False, _MAML_FAMILY, "algorithm"),
    "lam": (2.0, ("imaml",), "algorithm"),
    "cg_steps": (5, ("imaml",), "algorithm"),
    "ways": (5, ("glyphs", "omniglot"), "task"),
    "hidden": (32, ("glyphs", "omniglot"), "task"),
    "classes": (300, ("glyphs",), "task"),
    "data_path": (None, ("omniglot",), "task"),
    "data_seed": (0, ("glyphs", "omniglot"), "task"),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    for name, (default, scope, kind) in _SCOPED.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, default)
        elif getattr(args, kind) not in scope:
            flag = "--" + name.replace("_", "-")
            p.error(
                f"{flag} applies to --{kind} {' / '.join(scope)}, not {getattr(args, kind)}; "
                "drop it"
            )
    family = "sinusoid" if args.task == "sinusoid" else "image"
    meta_batch, shots, queries, inner_steps, inner_lr = _DEFAULTS[family]
    if args.algorithm in ("reptile", "leap", "warpgrad", "imaml") and args.inner_steps is None:
        inner_steps = 5 if args.algorithm != "imaml" else 10
    for name, value in (
        ("meta_batch", meta_batch),
        ("shots", shots),
        ("queries", queries),
        ("inner_steps", inner_steps),
        ("inner_lr", inner_lr),
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device torch knows; use cpu, cuda or cuda:1, ...")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.eval_tasks < 2:
        p.error("--eval-tasks must be at least 2, for a 95 % confidence interval")
    processes = _launched_processes()
    if args.meta_batch < processes:
        p.error(
            f"--meta-batch {args.meta_batch} is smaller than the {processes} torchrun processes "
            f"(each takes at least one task); pass --meta-batch {processes} or more"
        )
    if args.compile is not None:
        from torch._dynamo import list_backends

        if args.compile not in list_backends(exclude_tags=()):
            p.error(
                f"--compile {args.compile}: not a torch.compile backend; use one of "
                f"{', '.join(list_backends())} or aot_eager"
            )
    if args.task != "sinusoid" and args.ways < 2:
        p.error("--ways must be at least 2 for classification")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    joins = _launched_processes() > 1 and not distributed.is_initialized()
    try:
        return run(args)
    finally:
        if joins and distributed.is_initialized():  # the group run() made; nccl wants it closed
            torch.distributed.destroy_process_group()
