"""Where a step's time goes: the device's kernels against the host's Python, dispatch and launches.

For the contenders of bench/models.py (resnet50, AN-resnet50 with the paper's placement,
seresnet50; same options), times ``--steps`` training steps and inference calls of each
without the profiler, then profiles as many with torch.profiler, and prints per step:

- ``wall``: the median step, synchronised, profiler off;
- ``device``: on a GPU, the union of the kernels' intervals (the time the GPU computed); on the
  CPU, the ATen ops' self time (profiler on; AN's C kernels are not ATen ops: wall only);
- ``busy``: device / wall. Near 100%, the device bounds the step and only less work helps; far
  below, the host does (Python, dispatch, launches): fewer launches or CUDA graphs help;
- ``host``: the median time until the step's call returns, not synchronised: the host's
  Python, dispatch and launches where nothing in the step waits for the device; near ``wall``
  with ``busy`` high too, something waits (see ``syncs``);
- ``syncs``: on a GPU, the host's waits for the device a step (stream, event and device
  synchronisations; the profiled loop's final one counts 1 / steps), and copies to the host;
- ``launches``: kernels, copies and sets a step on a GPU; on the CPU, the outermost ATen calls
  but views and allocations (the C kernels of AN's sites not counted);

then, by kernel (or op) name, what the AN model spends a step beyond the base model, largest
first: the place to make cheaper; with ``--python N``, the N Python functions the AN model's
host spends most of a step in (cProfile, own time; the main thread only: a GPU backward's
Python runs in autograd's device thread). Compare rows of one run only. Meant for a GPU; on
the CPU it is a smoke run whose launch counts hold but whose op times are the profiler's (it
slows each op) and whose busy share can pass 100%.

    python bench/profile_step.py --device cuda --batch 64 [--amp]
    .venv/bin/python bench/profile_step.py --model resnet10t --se-model none --img-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from _contenders import add_arguments, build_models, step_functions  # bench/ on sys.path
from _timing import check_device, python_top, sync
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass
class StepProfile:
    """Per step: wall seconds (profiler off), device seconds, launches, and seconds by name."""

    wall: float
    device: float
    launches: float
    by_name: dict[str, float]
    host: float = 0.0
    syncs: float = 0.0
    host_by_name: dict[str, float] = field(default_factory=dict)  # GPU: host events' self time

    @property
    def busy(self) -> float:
        return self.device / self.wall


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of closed intervals ``(start, end)``: overlapping kernels (several
    streams) count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def device_events(events: Iterable, cuda: bool) -> list:
    """What the device ran: CUDA kernels, copies and sets; or the CPU's ATen ops."""
    if cuda:
        return [e for e in events if e.device_type == DeviceType.CUDA]
    return [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]


def _seconds(e: object, cuda: bool) -> float:
    """A device event's duration; a CPU op's self time (its children's taken out)."""
    return (e.time_range.elapsed_us() if cuda else e.self_cpu_time_total) * 1e-6


_VIEWS = frozenset(f"aten::{n}" for n in ("view", "t", "expand", "unsqueeze", "squeeze", "detach",
                                         "select", "slice", "alias", "as_strided", "permute",
                                         "transpose", "unbind", "split", "narrow"))  # fmt: skip


def _launches(events: list, cuda: bool) -> int:
    """CUDA: the events. CPU: the outermost ATen calls (from Python or autograd's engine; what
    runs inside one is part of it), views and allocations left out."""
    if cuda:
        return len(events)
    return sum(
        not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
        and e.name not in _VIEWS
        and not e.name.startswith("aten::empty")
        for e in events
    )


def sync_calls(events: Iterable) -> int:
    """The host's waits for a GPU among profiler events: CUDA runtime/driver synchronisations
    (host-side events) and device-to-host copies (device-side, which block a pageable host)."""
    return sum(
        ("Synchronize" in e.name and e.device_type == DeviceType.CPU)
        or ("DtoH" in e.name and e.device_type == DeviceType.CUDA)
        for e in events
    )


def profile_step(fn: Callable[[], None], steps: int, device: torch.device) -> StepProfile:
    """``fn`` timed ``steps`` times (median wall), then run ``steps`` times under the profiler."""
    walls, hosts = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t0)
        sync(device)
        walls.append(time.perf_counter() - t0)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    syncs = sync_calls(prof.events()) if cuda else 0
    events = device_events(prof.events(), cuda)
    if cuda:
        busy = union_length((e.time_range.start, e.time_range.end) for e in events) * 1e-6
    else:
        busy = sum(_seconds(e, cuda) for e in events)
    by_name: Counter[str] = Counter()
    for e in events:
        by_name[e.name] += _seconds(e, cuda) / steps
    host_by_name: Counter[str] = Counter()
    for e in prof.events() if cuda else ():
        if e.device_type == DeviceType.CPU:
            host_by_name[e.name] += e.self_cpu_time_total * 1e-6 / steps
    launches = _launches(events, cuda) / steps
    return StepProfile(
        statistics.median(walls), busy / steps, launches, by_name,
        host=statistics.median(hosts), syncs=syncs / steps, host_by_name=host_by_name,
    )  # fmt: skip


def extra(
    an: StepProfile, base: StepProfile, top: int, of: str = "by_name"
) -> list[tuple[str, float]]:
    """The ``top`` names on which ``an`` spends the most seconds a step beyond ``base``, by
    device time (``of="by_name"``) or by the host's self time (``"host_by_name"``)."""
    a, b = getattr(an, of), getattr(base, of)
    gaps = {n: a.get(n, 0.0) - b.get(n, 0.0) for n in set(a) | set(b)}
    return sorted(gaps.items(), key=lambda kv: -kv[1])[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--steps", type=int, default=10, help="timed and profiled steps each")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="names in the AN model's extra")
    p.add_argument("--python", type=int, default=0, help="the AN model's top Python functions")
    args = p.parse_args()
    check_device(p, args.device)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    models = build_models(args)
    names = list(models)  # base, AN, [SE]
    train_step, infer = step_functions(models, args)
    print(
        f"device={dev} batch={args.batch} img={args.img_size} threads={args.threads} "
        f"torch={torch.__version__} steps={args.steps}{' amp=bfloat16' if args.amp else ''}"
        f"{' channels_last' if args.channels_last else ''}"
    )
    for mode, fn in (("train step", train_step), ("inference", infer)):
        for _ in range(args.warmup):
            for name in names:
                fn(name)
        prof = {n: profile_step(lambda n=n, fn=fn: fn(n), args.steps, dev) for n in names}
        print(f"\n{mode}: {'model':>18s} {'wall ms':>9s} {'device ms':>10s} {'busy':>6s} "
              f"{'host ms':>8s} {'launches':>9s} {'syncs':>6s}")  # fmt: skip
        for n in names:
            r = prof[n]
            ms = f"{r.wall * 1e3:9.2f} {r.device * 1e3:10.2f} {r.busy:6.0%} {r.host * 1e3:8.2f}"
            print(f"{'':12s}{n:>18s} {ms} {r.launches:9.0f} {r.syncs:6.1f}")
        an, base = prof[names[1]], prof[names[0]]
        print(f"{'':12s}{names[1]} beyond {names[0]}, ms a step (device time by name):")
        for name, gap in extra(an, base, args.top):
            print(f"{'':14s}{gap * 1e3:8.3f}  {name[:100]}")
        if an.host_by_name:
            print(f"{'':12s}{names[1]} beyond {names[0]}, ms a step (host self time by name):")
            for name, gap in extra(an, base, args.top, "host_by_name"):
                print(f"{'':14s}{gap * 1e3:8.3f}  {name[:100]}")
        if args.python:
            print(python_top(lambda fn=fn: fn(names[1]), args.steps, args.python))


if __name__ == "__main__":
    main()
