"""The workflow's job graph for a config and targets, as Snakemake itself builds it (its Python
API: the Snakefile is read and the DAG built, no job runs). `iisan plan` prices and schedules
these jobs: it has no planner of its own.

Every job of the targets is listed whether or not its outputs exist already (Snakemake's
`--forceall` view), so a plan does not change as the run progresses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Node:
    """One job: its rule, wildcards, outputs and the jobs it reads from (by index)."""

    index: int
    rule: str
    wildcards: Mapping[str, str]
    outputs: tuple[str, ...]
    after: frozenset[int] = field(default_factory=frozenset)
    resources: Mapping[str, object] = field(default_factory=dict)  # as the rule requests them (runtime in minutes)
    priority: float = 0  # as the rule's `priority` gives it (0 where the rule sets none)

    @property
    def name(self) -> str:
        """The job's first output: how plans and logs name it."""
        return self.outputs[0] if self.outputs else self.rule


@dataclass
class Graph:
    """The jobs of a config's targets and the config Snakemake read (defaults filled, checked)."""

    nodes: list[Node]
    config: dict

    def ancestors(self, index: int) -> set[int]:
        seen: set[int] = set()
        todo = list(self.nodes[index].after)
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(self.nodes[i].after)
        return seen

    def nearest(self, index: int, keep) -> set[int]:
        """The closest jobs upstream of `index` for which `keep(node)` holds, looking through the
        others (a training run waits for the caches behind its pruning jobs)."""
        found: set[int] = set()
        seen: set[int] = set()
        todo = list(self.nodes[index].after)
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            if keep(self.nodes[i]):
                found.add(i)
            else:
                todo.extend(self.nodes[i].after)
        return found


def job_graph(directory: str | os.PathLike = ".", configfiles: Iterable[str | os.PathLike] = (),
              overrides: Mapping[str, object] | None = None, targets: Iterable[str] = (),
              resources: Mapping[str, int] | None = None, attempt: int = 1) -> Graph:
    """The DAG Snakemake builds for `targets` (default: the Snakefile's default target) with the
    workflow in `directory`, its config files and `--config` overrides (a string value is read
    as Snakemake's command line reads it). Snakemake's own errors (a missing input, a bad
    config) propagate as they are; the working directory and the environment are restored.
    `resources`: the global resources (`--resources`), which cap what a job may ask for (a local
    run caps `gpu` at this machine's cards unless given). `attempt`: the jobs' resources as a
    retry with this number would ask for them."""
    from snakemake.api import SnakemakeApi
    from snakemake.cli import parse_config
    from snakemake.settings.types import ConfigSettings, DAGSettings, ExecutionSettings, OutputSettings, Quietness, ResourceSettings

    directory = Path(directory).resolve()
    given = dict(overrides or {})
    config = {**parse_config([f"{k}={v}" for k, v in given.items() if isinstance(v, str)]),
              **{k: v for k, v in given.items() if not isinstance(v, str)}}
    files = [Path(f) if Path(f).is_absolute() else directory / f for f in configfiles]
    cwd, environ = Path.cwd(), dict(os.environ)  # the Snakefile may set variables (the rehearsal does)
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            workflow_api = api.workflow(ResourceSettings(cores=1, resources=dict(resources or {})), ConfigSettings(configfiles=files, config=config),
                                        snakefile=directory / "Snakefile", workdir=directory)
            workflow_api.dag(DAGSettings(targets=set(targets), forceall=True))
            workflow = workflow_api._workflow
            if attempt != 1:
                workflow.execution_settings = ExecutionSettings(attempt=attempt)
            workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
            workflow._build_dag()
            dag = workflow.dag
            dag.update_priority()  # the rules' priorities, as a run sets them before it schedules
            jobs = sorted(dag.jobs, key=lambda j: (j.rule.name, str(j.output[0]) if j.output else ""))
            index = {job: i for i, job in enumerate(jobs)}
            nodes = [Node(i, job.rule.name, dict(job.wildcards_dict), tuple(str(o) for o in job.output),
                          frozenset(index[d] for d in dag.dependencies[job] if d in index),
                          {k: v for k, v in job.resources.items() if not k.startswith("_")},
                          dag.priority(job)) for i, job in enumerate(jobs)]
            return Graph(nodes, dict(workflow.config))
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
