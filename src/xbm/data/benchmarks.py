"""Task sequences: a base task that pretrains the backbone, then new tasks adapted one by one."""

from __future__ import annotations

from dataclasses import dataclass, field

from xbm.errors import unknown


@dataclass
class Benchmark:
    """A multi-task sequence.

    Attributes:
        base: dataset the shared backbone is pretrained on.
        tasks: datasets added afterwards, in order, each with its own mask/classifier.
    """

    base: str
    tasks: list[str] = field(default_factory=list)

    @property
    def all_tasks(self) -> list[str]:
        """Base task first, then the new tasks."""
        return [self.base, *self.tasks]


#: The offline "MNIST-family" protocol of docs/papers.md section 2.3: Fashion-MNIST pretrains the
#: backbone (it does not overlap in domain with the new tasks), then digits, animal silhouettes
#: and rendered letters are added.
BENCHMARKS: dict[str, Benchmark] = {
    "mnist-family": Benchmark(base="fashion-mnist", tasks=["mnist", "animal-mnist", "letters"]),
}


def get_benchmark(name: str) -> Benchmark:
    """Look up a benchmark; returns a copy so callers cannot edit the registry by accident.

    Raises:
        UnknownNameError: ``name`` is not in :data:`BENCHMARKS`.
    """
    try:
        bench = BENCHMARKS[name]
    except KeyError:
        raise unknown("benchmark", name, BENCHMARKS) from None
    return Benchmark(bench.base, list(bench.tasks))
