"""``run``: the run's processes, folder, data, model, snapshot or fresh start, the training loop
(with its non-finite checks and Ctrl-C), evaluation and the report."""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import metafunc

from .. import distributed
from .._threads import choose_threads
from ._cli import _MAX_SKIPS, _config, _launched_processes, _resume_command
from ._config import render as render_config
from ._config import write as write_config
from ._errors import PROG, RunError, _why
from ._folder import RunFolder, _share_folder
from ._learners import _choose_strategy, _Compiled, _learner, _msl_weights, compiled_meta_grad
from ._metrics import MetricsLog, inner_lrs
from ._models import build, input_shape
from ._report import Progress, _summaries, _warn, _write
from ._snapshot import _check_data, _check_resume, _fingerprint, _load_checkpoint, _restore, _save
from ._tasks import _TEST_SEED, _VAL_SEED, Tasks


class _CtrlC:
    """While active, the first Ctrl-C (SIGINT) only sets ``pressed``: the training loop finishes
    its step, saves and stops. A second one interrupts at once. Only in the main thread of a
    single process (under torchrun the processes would not agree on the step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pressed = False
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        # only over Python's own handler: not over one of the caller's, nor SIGINT ignored
        self.enabled &= signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


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


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Runs ``args`` (parsed from ``argv``, which the lock's owner file and the resume command
    repeat): folder, data, model, snapshot or fresh start, training loop, report."""
    device = _init_distributed(args)
    main_process = distributed.rank() == 0
    folder = _share_folder(args, f"{PROG} {shlex.join(argv)}", main_process)
    threads = torch.get_num_threads()  # _run sets its own; a caller in Python gets it back
    try:
        return _run(args, argv, device, folder, main_process)
    except KeyboardInterrupt:  # a second Ctrl-C, one outside the training loop, or torchrun
        again = folder.saved is not None
        resume = f" Resume with: {_resume_command(argv, args, folder.path)}" if again else ""
        raise RunError(f"interrupted. {folder.kept()}{resume}", 130) from None
    finally:
        folder.close()
        torch.set_num_threads(threads)


def _run(args, argv, device: torch.device, folder: RunFolder, main_process: bool) -> dict:
    out = folder.path
    resumed = None
    if args.resume:  # the flags first: a refused resume loads no data
        resumed = _load_checkpoint(folder.checkpoint)
        _check_resume(args, resumed)
        folder.saved = resumed["step"]
    torch.manual_seed(args.seed)
    tasks = Tasks(args)
    fingerprint = _fingerprint(args)
    if resumed is not None:
        _check_data(args, resumed, fingerprint)
    model = build(args).to(device)
    fm = metafunc.functionalize(model)
    threads = _set_threads(args, model, device)
    if resumed is not None:
        strategy = resumed["strategy"]
    elif distributed.world_size() == 1:
        strategy = _choose_strategy(args, fm, model, tasks, device)
    else:  # rank 0 times one process's share alone; every process runs its pick
        chosen = [_choose_strategy(args, fm, model, tasks, device) if main_process else None]
        torch.distributed.broadcast_object_list(chosen, src=0)
        strategy = chosen[0]
    learner = _learner(args, fm, model, tasks.loss, strategy)
    compiled = compiled_meta_grad(args.compile) if args.compile else None
    meta = learner.init()
    leaves = optree.tree_leaves(meta)
    outer = torch.optim.Adam(leaves, lr=args.outer_lr)
    generator = torch.Generator().manual_seed(args.seed)
    history: dict[str, list] = {"step": [], "meta_loss": [], "val_step": [], "val_loss": []}
    if args.task != "sinusoid":
        history["val_accuracy"] = []
    start, seconds, smooth, skipped = 0, 0.0, None, []
    before = None
    if resumed is not None:
        _restore(folder.checkpoint, resumed, leaves, outer, generator)
        if hasattr(learner, "load_state_dict"):  # WarpGrad: one replay buffer per process
            states = resumed["learner"] or []
            if len(states) != distributed.world_size():
                raise RunError(
                    f"--resume: the checkpoint holds {len(states)} per-process "
                    f"{args.algorithm} states (replay buffers), this run has "
                    f"{distributed.world_size()} processes. Resume with the same number of "
                    "processes.",
                    2,
                )
            learner.load_state_dict(states[distributed.rank()])
        history, start, seconds = resumed["history"], resumed["step"], resumed["seconds"]
        smooth, skipped, before = resumed["smooth"], resumed["skipped"], resumed["before"]
    # metrics.csv (and with --tensorboard the event files) in the main process
    texts = {"run/strategy": strategy, "run/config": render_config(_config(args))}
    log = MetricsLog(folder, args.tensorboard, start, texts) if main_process else None
    try:
        show = not args.quiet and main_process  # progress on stderr
        if start == 0:
            before = _evaluate(
                learner, meta, tasks, "test", args.eval_tasks, _TEST_SEED, device, tasks.chunk,
                shown="before meta-training" if show else None,
            )  # fmt: skip
            before_summaries = _summaries(before, "before meta-training" if main_process else None)
            if log is not None:
                log.test(before_summaries, 0)
        progress = Progress(args.steps, start, enabled=show)
        t0 = time.perf_counter()

        def checkpoint(step: int) -> None:
            # one host sync per checkpoint: parameters are never saved non-finite
            if not torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).all():
                raise RunError(
                    f"step {step}: the meta-parameters are not finite, so they were not saved. "
                    f"Lower --outer-lr ({args.outer_lr}) and start again. {folder.kept()}"
                )
            states = None
            if hasattr(learner, "state_dict"):  # per-process state (WarpGrad's replay buffer)
                state = learner.state_dict()
                states = [state]
                if distributed.world_size() > 1:
                    states = [None] * distributed.world_size()
                    torch.distributed.all_gather_object(states, state)
            if main_process:  # one writer; the others hold the same parameters
                payload = {
                    "args": _config(args),
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
                    "data": fingerprint,
                    "skipped": skipped,
                }
                _save(folder, step, payload)
            if log is not None:  # in step with the checkpoint: a resume never repeats a row
                if log.written is None:  # this run's first checkpoint: its resolved flags too
                    _write_config(folder, args)
                log.save(history)
            folder.saved = step

        in_a_row = 0  # non-finite steps skipped just before this one (resumes continue the count)
        while start - in_a_row in skipped:
            in_a_row += 1
        val_text = ""
        with _CtrlC(enabled=distributed.world_size() == 1) as ctrl_c:
            try:
                for step in range(start + 1, args.steps + 1):
                    if args.algorithm == "mamlpp":  # anneal the multi-step loss over the first 25 %
                        learner = learner.with_step_weights(
                            _msl_weights(args.inner_steps, step / (0.25 * args.steps))
                        )
                    episode = tasks.sample("train", args.meta_batch, generator, device)
                    validated = False
                    # one process: learner.meta_grad; under torchrun each process takes its share
                    # of the tasks and the task-weighted mean is all-reduced (metafunc.distributed)
                    grads, metrics = distributed.meta_grad(
                        learner if compiled is None else _Compiled(learner, compiled),
                        meta,
                        episode.support,
                        episode.query,
                    )
                    grad_leaves = optree.tree_leaves(grads)
                    # the step's one host sync: the mean meta-loss and each gradient's largest
                    # |entry|, NaN or inf when an entry is not finite (one fused kernel over all
                    # leaves, where isfinite(g).all() would take two per leaf)
                    peaks = torch._foreach_norm(grad_leaves, math.inf)
                    loss, *peak = torch.stack([metrics["loss"].detach().mean(), *peaks]).tolist()
                    finite = [math.isfinite(p) for p in peak]
                    if math.isfinite(loss) and all(finite):
                        for leaf, g in zip(leaves, grad_leaves):
                            leaf.grad = g
                        outer.step()
                        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
                        in_a_row = 0
                    else:  # the step is not applied
                        in_a_row += 1
                        if args.on_nonfinite == "stop" or in_a_row >= _MAX_SKIPS:
                            message = _nonfinite(step, loss, finite, grads, episode, args, in_a_row)
                            raise RunError(f"{message} {folder.kept()}")
                        skipped.append(step)
                    history["step"].append(step)
                    history["meta_loss"].append(smooth)
                    if step % args.eval_every == 0 or step == args.steps:
                        val_text = _validate(learner, meta, tasks, args, device, step, history)
                        validated = True
                    if log is not None and log.writer is not None:  # --tensorboard
                        lrs = None
                        if validated:  # the learned rates cost a host sync: at validations only
                            inner = inner_lrs(meta, args.inner_lr)
                            lrs = {"outer": outer.param_groups[0]["lr"], "inner": inner}
                        log.step(step, history, lrs)
                    if step % args.checkpoint_every == 0 or step == args.steps:
                        checkpoint(step)
                    shown = "-" if smooth is None else f"{smooth:.3f}"
                    progress.update(step, f"meta-loss {shown} {val_text}")
                    if ctrl_c.pressed:
                        if folder.saved != step:
                            checkpoint(step)
                        raise RunError(
                            f"interrupted after step {step}; saved {folder.checkpoint} (step "
                            f"{step}). Resume with: {_resume_command(argv, args, out)}",
                            130,
                        )
            finally:
                progress.close()
        seconds += time.perf_counter() - t0
        final = _evaluate(
            learner, meta, tasks, "test", args.eval_tasks, _TEST_SEED, device, tasks.chunk,
            shown="after meta-training" if show else None,
        )  # fmt: skip
        results: dict[str, Any] = {
            "algorithm": args.algorithm,
            "task": args.task,
            "config": _config(args),
            "strategy": strategy,
            "device": str(device),
            "threads": threads,
            "processes": distributed.world_size(),
            "versions": {
                "metafunc": metafunc.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "meta_steps": args.steps,
            "train_seconds": seconds,
            "skipped_steps": skipped,
            "test_before": _summaries(before or {}, None),
            "test_after": _summaries(final, "after meta-training" if main_process else None),
            "history": history,
        }
        if not main_process:
            return results
        if log is not None:
            log.test(results["test_after"], args.steps)
        _write(results, args, folder, learner, meta, tasks, device)
        return results
    finally:
        if log is not None:
            log.close()


def _write_config(folder: RunFolder, args: argparse.Namespace) -> None:
    """``config.toml``: the run's resolved flags, which ``--config`` reads back into the run."""
    try:
        write_config(folder.path, _config(args))
    except OSError as e:
        raise RunError(
            f"cannot write {folder.path / 'config.toml'}: {_why(e)}. Is the disk full? "
            f"{folder.kept()}"
        ) from None


def _set_threads(args, model: nn.Module, device) -> dict[str, Any]:
    """Sets torch's intra-op thread count (``--threads``, else :func:`choose_threads` from the
    cores this process may use and the FLOPs of a forward pass over one meta-batch's support
    sets); returns ``{"count", "reason"}`` for results.json."""
    work = 0.0
    if args.threads is None:  # zeros of the support sets' shape: no data drawn, no RNG used
        examples = args.meta_batch * args.shots * (1 if args.task == "sinusoid" else args.ways)
        x = torch.zeros(examples, *input_shape(args), device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        work = counter.get_total_flops()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    count, reason = choose_threads(args.threads, work=work, local_processes=local)
    torch.set_num_threads(count)
    return {"count": count, "reason": reason}


def _nonfinite(step: int, loss: float, finite: list, grads, episode, args, in_a_row: int) -> str:
    """What went non-finite at ``step`` and the likely cause (the data is checked only now)."""
    what = [f"the meta-loss is {loss}"] if not math.isfinite(loss) else []
    bad = ["/".join(map(str, p)) for p, ok in zip(optree.tree_paths(grads), finite) if not ok]
    if bad:
        more = " and more" if len(bad) > 3 else ""
        what.append(f"the meta-gradient of {', '.join(bad[:3])}{more} is not finite")
    text = " and ".join(what)
    if in_a_row >= _MAX_SKIPS:
        text = f"{in_a_row} meta-steps in a row had a non-finite meta-loss or gradient ({text})"
    tensors = [t for t in (*episode.support, *episode.query) if t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        where = f" in --data-path {args.data_path}" if args.data_path is not None else ""
        cause = f"the meta-batch's data holds NaN or infinity; check the data{where}."
    elif args.inner_lr is None:  # ProtoNet, R2-D2, MetaOptNet: no inner loop
        cause = (
            f"the learning rate is too high (--outer-lr {args.outer_lr}). Lower --outer-lr and "
            "start again with --overwrite."
        )
    else:
        cause = (
            f"the learning rates are too high (--inner-lr {args.inner_lr}, --outer-lr "
            f"{args.outer_lr}). Lower --outer-lr or --inner-lr and start again with --overwrite."
        )
    if args.on_nonfinite == "stop":
        cause += " Or pass --on-nonfinite skip to skip such steps."
    return f"step {step}: {text}. Likely cause: {cause}"


def _evaluate(
    learner,
    meta,
    tasks: Tasks,
    split: str,
    n: int,
    seed: int,
    device,
    chunk: int,
    shown: str | None = None,
):
    """Post-adaptation query metrics on ``n`` fixed tasks of ``split`` (same tasks every time),
    ``chunk`` tasks at a time. With ``shown`` (when it is, e.g. ``"before meta-training"``),
    progress on stderr: ``evaluating N test tasks (before meta-training): k/N``."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    label = f"evaluating {n} {split} tasks ({shown}):"
    progress = Progress(n, 0, enabled=shown is not None, label=label)
    progress.update(0, "")
    left = n
    while left > 0:
        k = min(chunk, left)
        episode = tasks.sample(split, k, generator, device)
        # under torchrun each process adapts to its share of the tasks; all get every metric
        metrics = distributed.evaluate(learner, meta, episode.support, episode.query)
        for key, value in metrics.items():
            parts.setdefault(key, []).append(value.detach())
        left -= k
        progress.update(n - left, "")
    progress.close()
    return {key: torch.cat(v) for key, v in parts.items()}


def _validate(learner, meta, tasks, args, device, step: int, history: dict) -> str:
    """Post-adaptation loss (and accuracy) on the val tasks into ``history``; null when not
    finite, with a warning. Returns the progress bar's text."""
    val = _evaluate(learner, meta, tasks, "val", args.val_tasks, _VAL_SEED, device, tasks.chunk)
    loss = val["loss"].mean().item()
    accuracy = val["accuracy"].mean().item() if "accuracy" in val else None
    if not math.isfinite(loss):
        if distributed.rank() == 0:
            bad = int((~torch.isfinite(val["loss"])).sum())
            _warn(
                f"step {step}: the validation loss is not finite on {bad} of "
                f"{val['loss'].numel()} tasks; results.json records null"
            )
        loss = accuracy = None
    history["val_step"].append(step)
    history["val_loss"].append(loss)
    if "accuracy" in val:
        history["val_accuracy"].append(accuracy)
    if loss is None:
        return "val loss not finite"
    return f"val loss {loss:.3f}" + (f" acc {accuracy:.3f}" if accuracy is not None else "")
