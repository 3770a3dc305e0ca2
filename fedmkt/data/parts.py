"""Which examples each party holds: the shared public and evaluation sets, and its own private set.

Each part comes from an explicit data source (`data.public`, `data.eval`, `clients[i].data`,
`clients[i].eval`) or, where none is given, from the `data.task` preset that carves one embedded
task into eval + public + K private parts. `party_data` reads only what one party may hold — a
client's private source is read by that client alone — so the same call serves every party in one
process and one party on its own machine.

`data.public_labels` decides whether the public set keeps its answers. Without them, every public
example reaches the party stripped of its answer (`without_answer`); the gold answers of a
labelled source are kept apart, in `PartyData.public_gold`, for the one diagnostic that may read
them (how often a party's own answer is the gold one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedmkt.config import DataSource, RunConfig
from fedmkt.data.examples import Example, Format, content_key, format_of, without_answer
from fedmkt.data.sources import load_source
from fedmkt.data.tasks import TASK_FORMATS, FederatedSplit, load_task, split_domains, split_task
from fedmkt.errors import FedMKTError

__all__ = ["PartyData", "SourceReader", "party_data", "federation_data", "check_disjoint"]

SERVER = "server"


@dataclass
class PartyData:
    """What one party trains and is scored on."""

    public: list[Example]
    private: list[Example]
    evaluation: list[Example]
    own_evaluation: Optional[list[Example]]
    format: Format
    public_labelled: bool = True
    """Whether `public` carries its answers (else each party answers the public questions itself)."""
    public_gold: Optional[list[Example]] = None
    """Unlabelled public set from a labelled source: the same questions with their answers, read
    only for the `public_answer_accuracy` diagnostic (never batched, never shared)."""
    evaluation_sets: Optional[dict[str, list[Example]]] = None
    """Named held-out sets (`data.eval_sets` or the domains preset's tasks); `evaluation` pools them."""


class SourceReader:
    """Loads each source of a run once, in the run's one format, and the preset split when needed."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._split: Optional[FederatedSplit] = None
        self._loaded: dict[str, list[Example]] = {}
        self.format = self._run_format()

    def _run_format(self) -> Format:
        """The preset task's format, else that of the common evaluation set (every set must match)."""
        data = self.config.data
        if data.task is not None or data.client_tasks is not None:
            key, tasks = (
                ("data.task", [data.task]) if data.task is not None else ("data.client_tasks", data.client_tasks)
            )
            unknown = [task for task in tasks if task not in TASK_FORMATS]
            if unknown:
                raise FedMKTError(
                    f"{key}: unknown task {unknown[0]!r}. Fix: use one of {', '.join(TASK_FORMATS)}, or null."
                )
            formats = {TASK_FORMATS[task] for task in tasks}
            if len(formats) > 1:
                raise FedMKTError(
                    f"data.client_tasks mixes multiple-choice and generation tasks ({', '.join(tasks)}). "
                    "Fix: give every client a task of one format."
                )
            return formats.pop()  # type: ignore[return-value]
        if data.eval_sets is not None:
            name, source = next(iter(data.eval_sets.items()))
            return format_of(self.source(f"data.eval_sets.{name}", source, check_format=False)[0])
        if data.eval is None:
            raise FedMKTError(
                "data.eval is not set and there is no data.task preset. Fix: set data.eval to a data source, or set data.task."
            )
        return format_of(self.source("data.eval", data.eval, check_format=False)[0])

    def split(self, missing_key: str) -> FederatedSplit:
        """The preset's carve of `data.task` (the same on every machine for the same seed)."""
        data = self.config.data
        if data.task is None and data.client_tasks is None:
            raise FedMKTError(
                f"{missing_key} is not set and there is no data.task preset. Fix: set {missing_key} to a data source, or set data.task."
            )
        if self._split is None and data.client_tasks is not None:
            if data.data_dir is not None:
                raise FedMKTError(
                    "data.data_dir replaces one preset task's rows, but data.client_tasks names several. "
                    "Fix: set data.data_dir: null, or give the parts as sources (data.public, clients[i].data, data.eval_sets)."
                )
            tasks = {task: load_task(task) for task in data.client_tasks}
            self._split = split_domains(tasks, data.eval_size, data.pool_size, self.config.seed, data.public_size)
        if self._split is None:
            examples = load_task(data.task, data.data_dir)
            self._split = split_task(
                examples,
                len(self.config.clients),
                data.eval_size,
                data.pool_size,
                self.config.seed,
                public_size=data.public_size,
            )
        return self._split

    def source(
        self, key: str, source: DataSource, check_format: bool = True, answers_optional: bool = False
    ) -> list[Example]:
        if key not in self._loaded:
            self._loaded[key] = load_source(source, key, self.format if check_format else None, answers_optional)
        return self._loaded[key]

    def public_as_read(self) -> list[Example]:
        data = self.config.data
        if data.public is None:
            return self.split("data.public").public
        return self.source("data.public", data.public, answers_optional=True)

    def public_labelled(self) -> bool:
        """Whether the run's public set keeps its answers (`data.public_labels`, else whether the source has them)."""
        wanted, examples = self.config.data.public_labels, self.public_as_read()
        has_answers = all(example.labelled for example in examples)
        if wanted and not has_answers:
            raise FedMKTError(
                f"data.public_labels is true but data.public ({self.config.data.public.path}) has no answer column. "
                "Fix: set data.public_labels: false (or null) to use it unlabelled, or point data.public at a source with answers."
            )
        return has_answers if wanted is None else wanted

    def public(self) -> list[Example]:
        """The public set as every party holds it: without answers when the run's public set is unlabelled."""
        examples = self.public_as_read()
        return examples if self.public_labelled() else [without_answer(example) for example in examples]

    def public_gold(self) -> Optional[list[Example]]:
        """The labelled source's examples behind an unlabelled public set (the diagnostic's only input)."""
        examples = self.public_as_read()
        if self.public_labelled() or not all(example.labelled for example in examples):
            return None
        return examples

    def evaluation_sets(self) -> Optional[dict[str, list[Example]]]:
        """The named held-out sets: `data.eval_sets`, else the domains preset's one per task, else None."""
        data = self.config.data
        if data.eval_sets is not None:
            named = {name: self.source(f"data.eval_sets.{name}", source) for name, source in data.eval_sets.items()}
        elif data.eval is None and data.client_tasks is not None:
            named = self.split("data.eval").evaluation_sets
        else:
            return None
        keys = [(f"data.eval_sets.{name}", examples) for name, examples in named.items()]
        for position, (key, examples) in enumerate(keys):  # a question in two sets would count twice pooled
            check_disjoint({key: examples}, dict(keys[:position]))
        return named

    def evaluation(self) -> list[Example]:
        """The common held-out set: `data.eval`, the named sets pooled, or the preset's part."""
        data = self.config.data
        if data.eval is not None:
            return self.source("data.eval", data.eval)
        named = self.evaluation_sets()
        if named is not None:
            return [example for examples in named.values() for example in examples]
        return self.split("data.eval").evaluation

    def evaluation_keys(self) -> dict[str, list[Example]]:
        """Every common held-out set under the key that names it in errors."""
        named = self.evaluation_sets()
        if named is None:
            return {"data.eval": self.evaluation()}
        return {f"data.eval_sets.{name}": examples for name, examples in named.items()}

    def private(self, client: int) -> list[Example]:
        source = self.config.clients[client].data
        key = f"clients[{client}].data"
        return self.source(key, source) if source is not None else self.split(key).private[client]

    def own_evaluation(self, client: int) -> Optional[list[Example]]:
        source = self.config.clients[client].eval
        return self.source(f"clients[{client}].eval", source) if source is not None else None


def party_data(config: RunConfig, name: str, loader: Optional[SourceReader] = None) -> PartyData:
    """The examples party `name` holds; its evaluation sets are checked against its training sets."""
    loader = loader or SourceReader(config)
    public, evaluation = loader.public(), loader.evaluation()
    own_evaluation = None
    if name == SERVER:  # the server owns no private data, except in the centralized baseline
        centralized = config.federation.mode == "centralized"
        clients = range(len(config.clients)) if centralized else ()
        training = {f"clients[{i}].data": loader.private(i) for i in clients}
        # Centralized: the server trains on all the data there is, the public part included (which
        # FedMKT's server also trains on), so it bounds what federating can give the server; an
        # unlabelled public part has nothing to train on.
        labelled_public = list(public) if centralized and loader.public_labelled() else []
        private = labelled_public + [e for part in training.values() for e in part]
    else:
        index = int(name.split("_", 1)[1])
        private = loader.private(index)
        training = {f"clients[{index}].data": private}
        own_evaluation = loader.own_evaluation(index)
    evaluations = loader.evaluation_keys() | ({f"{name}.eval": own_evaluation} if own_evaluation is not None else {})
    check_disjoint(evaluations, {"data.public": loader.public_as_read()} | training)
    labelled = loader.public_labelled()
    if config.transfer.teacher == "random" and (labelled or loader.format != "multiple_choice"):
        raise FedMKTError(
            "transfer.teacher: random draws each teacher's answer among a question's options, which needs an "
            "unlabelled multiple-choice public set. Fix: set data.public_labels: false (multiple choice), or use "
            "transfer.teacher: hard."
        )
    return PartyData(
        public,
        private,
        evaluation,
        own_evaluation,
        loader.format,
        labelled,
        loader.public_gold(),
        loader.evaluation_sets(),
    )


def federation_data(config: RunConfig, names: list[str]) -> dict[str, PartyData]:
    """Every party's examples for an in-process run, each source read once, and every evaluation
    set checked against every training set of the federation (public and all private)."""
    loader = SourceReader(config)
    parts = {name: party_data(config, name, loader) for name in names}
    evaluations = loader.evaluation_keys()
    evaluations |= {
        f"clients[{i}].eval": e for i in range(len(config.clients)) if (e := loader.own_evaluation(i)) is not None
    }
    training = {"data.public": loader.public_as_read()} | {
        f"clients[{i}].data": loader.private(i) for i in range(len(config.clients))
    }
    check_disjoint(evaluations, training)
    return parts


def check_disjoint(evaluations: dict[str, list[Example]], training: dict[str, list[Example]]) -> None:
    """Raise if an evaluation example is also a training example (same normalised text, whatever its
    id): a score on seen data means nothing."""
    seen = {content_key(e): (key, e) for key, examples in training.items() for e in examples}
    for eval_key, examples in evaluations.items():
        for example in examples:
            hit = seen.get(content_key(example))
            if hit is not None:
                train_key, twin = hit
                count = sum(content_key(e) in seen for e in examples)
                # No text and no id of the training twin: on a Flower node this message reaches the
                # server, and the twin may be a private row.
                raise FedMKTError(
                    f"{count} example(s) of {eval_key} are also in {train_key} or another training set "
                    f"(e.g. the one with id {example.uid!r} in {eval_key}). "
                    f"Fix: remove them from {eval_key} or from the training sets."
                )
