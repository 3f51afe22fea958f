"""The configuration contract: a typed schema, composed by Hydra from `configs/`, checked at start-up.

Hydra composes `configs/config.yaml` with its groups and the command-line overrides; the result is merged
into the structured schema below, so an unknown key or a value of the wrong type fails with one message
naming the key. Semantic checks (allowed values, divisibility) follow in `validate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actors.judges.protocol import DEFAULT_META_REGEX, DEFAULT_REWARD_REGEX

from .errors import ConfigError, one_line


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # Self-Rewarding paper: 0.7 / top-p 0.9
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256
    stop_strings: list = field(default_factory=list)


def sampling_params(s: SamplingConfig, end_of_turn: tuple[str, ...] = ()):
    """The engines' SamplingParams for a sampling block of the configuration. `end_of_turn`: the stop strings
    the chat format implies (ChatRenderer.stop_strings), added to the configured ones as the reference's
    `end_strings` are."""
    from actors.engines.protocol import SamplingParams

    stops = tuple(dict.fromkeys([*s.stop_strings, *end_of_turn]))
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens, stop_strings=stops)


@dataclass
class AlgorithmConfig:
    name: str = "self_rewarding"
    num_responses_to_gen: int = 4
    num_evals_to_average: int = 3
    max_iterations: int = 3
    max_epochs: int = 1
    max_steps: int = -1  # total optimizer steps over all iterations; -1 = no cap
    global_batch_size: int = 64
    micro_batch_size: int = 1
    ref_policy_kl_penalty: Any = 0.1  # beta: a number, or one per iteration
    preference_loss: str = "dpo"
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    gt_reward_scale: float = 1.0  # eta of the rpo_* losses
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    first_iteration_sft: bool = False
    length_control: Any = 0.0  # rho: a number, or one per iteration
    limit_train_batches: Any = 1.0  # per epoch: a fraction (float) of the prompts, or a count (int) of GBS-sized prompt batches
    limit_val_batches: Any = 1.0  # the same for the validation set
    val_check_interval: int = -1  # validate every N steps (and always at iteration ends); -1 = only there
    save_interval: int = -1  # checkpoint every N steps (and always at iteration ends); -1 = only there
    reset_optimizer_each_iteration: bool = False
    normalise_prompt: bool = False  # judges see multi-turn prompts as plain "User: / Assistant:" turns
    use_meta_judge: bool = False  # Meta-Rewarding: also train the judge on meta-judge preferences
    meta_judge_pcnt: float = 0.15  # at most round(meta_judge_pcnt * GBS) judge pairs per global batch
    meta_max_relative_pcnt: float = 0.4  # a chosen-score class may hold at most this share of judge pairs
    rollout_batch_size: int = 16  # prompts per generation call to one replica
    max_prompts_ahead: int = 256  # prompts in flight ahead of the learner (bounds buffered pairs)
    # Streaming refits (docs/streaming.md): the pools take the learner's weights every N optimizer steps inside
    # an iteration; null = at iteration boundaries only (the papers' iterative scheme).
    refit_every_steps: Optional[int] = None
    max_policy_lag: Optional[int] = None  # most versions a pair may lag the learner when trained; older: dropped
    reference_update: str = "iteration"  # iteration: pi_ref = M_t | initial: pi_ref = the starting model, always
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class JudgeSamplingConfig:
    """The judge's own sampling; each field left null takes the policy's value (algorithm.sampling)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_new_tokens: Optional[int] = None
    stop_strings: Optional[list] = None

    def resolve(self, policy: SamplingConfig) -> SamplingConfig:
        return SamplingConfig(**{f: getattr(policy, f) if getattr(self, f) is None else getattr(self, f)
                                 for f in ("temperature", "top_p", "top_k", "max_new_tokens", "stop_strings")})


@dataclass
class JudgeModelConfig:
    """judge.backend=model: a fixed judge checkpoint in its own pool (cluster.judges), never refit."""

    path: Optional[str] = None  # a Hugging Face checkpoint directory (with model=toy: the toy world's M1, logged)
    chat_template: Optional[str] = None  # None = the judge tokenizer's own; nemo | llama3 | a Jinja string
    dtype: Optional[str] = None  # None = model.dtype
    max_seq_len: Optional[int] = None  # the judge engine's context; None = model.max_seq_len, else the judge's own


@dataclass
class JudgeTritonConfig:
    """judge.backend=triton: a judge served by `python -m actors.serve_judge`, reached with tritonclient."""

    url: str = "127.0.0.1:8000"  # host:port of the server's HTTP (protocol=http) or gRPC (protocol=grpc) port
    protocol: str = "http"  # http | grpc
    model_name: str = "judge"  # serve_judge's model_name
    timeout_s: float = 120.0  # one request (a batch of judgements) may take this long
    retries: int = 3  # tries after the first per request (malformed reply, timeout, no server), then stop
    retry_backoff_s: float = 1.0  # wait before retry r: retry_backoff_s * 2**(r-1)
    concurrency: int = 4  # requests in flight per judge replica (cluster.judges.replicas)
    chat_template: Optional[str] = None  # None = the served tokenizer's own; nemo | llama3 | a Jinja string


@dataclass
class JudgeConfig:
    backend: str = "policy"  # actors/judges: who judges
    template: str = "default"  # "default" (orchestration/judge_templates.py), "toy", a file path, or the text
    reward_regex: str = DEFAULT_REWARD_REGEX  # the score: its first group, in [score_low, score_high]
    score_match: str = "first"  # first | last: which match of reward_regex and meta_reward_regex counts
    score_low: float = 0.0
    score_high: float = 5.0
    meta_template: str = "default"  # the meta-judge prompt: {prompt} {response} {judgement_a} {judgement_b}
    meta_reward_regex: str = DEFAULT_META_REGEX  # the verdict: its first group, A or B
    meta_max_new_tokens: Optional[int] = None  # the meta-judge's answer length; None = judge.sampling's
    # the meta-judge's temperature; None = judge.sampling's. 0 (greedy) makes it the judge's mode: a judgement
    # that disagrees with it is more often a sampling slip than a better reading (docs/meta_rewarding.md)
    meta_temperature: Optional[float] = None
    sampling: JudgeSamplingConfig = field(default_factory=JudgeSamplingConfig)
    model: JudgeModelConfig = field(default_factory=JudgeModelConfig)  # judge.backend=model
    triton: JudgeTritonConfig = field(default_factory=JudgeTritonConfig)  # judge.backend=triton
    # judge.backend=verifier: the verifier (actors/verifiers) of samples whose metadata names none; None = they
    # get no score. A sample that names one is verifier-scored with every backend.
    default_verifier: Optional[str] = None


@dataclass
class SpinConfig:
    mix_previous_iteration: bool = False  # also train on (ground truth, M_{t-1}'s response), as the paper did


@dataclass
class GenerationConfig:
    output_file: Optional[str] = None  # None = <output_dir>/generations.jsonl
    keep_unended: bool = True  # keep responses that hit max_new_tokens, flagged "ended": false


@dataclass
class OptimSchema:
    lr: float = 5e-7
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "constant"
    max_grad_norm: float = 1.0


@dataclass
class ToyConfig:
    cache_dir: str = "~/.cache/selfreward"
    seed: Optional[int] = None  # the toy world's seed (data, tokenizer, M0, bootstrap); None = the run's seed
    max_operand: int = 49
    train_prompts: int = 512
    val_prompts: int = 512
    bootstrap_steps: int = 600  # the judge phase's steps
    bootstrap_lr: float = 3e-3
    meta_judgements: Optional[int] = None  # meta-judge bootstrap examples; None = 1500 with the meta-judge, else 0
    answer_target: float = 0.4  # the answer phase stops at this greedy accuracy on held-out dev questions
    answer_steps: int = 600  # the answer phase's most steps
    device: str = "cpu"  # where the bootstrap runs: cpu | cuda (a different M1, as good; its own cache entry)


@dataclass
class ModelConfig:
    name: str = "toy"
    path: Optional[str] = None  # a Hugging Face checkpoint directory; overrides the toy model
    dtype: str = "float32"
    max_seq_len: Optional[int] = None  # engine context; None = the model's, capped at 4096
    toy: ToyConfig = field(default_factory=ToyConfig)


@dataclass
class DataConfig:
    train_file: Optional[str] = None  # None with model=toy: the toy world's files
    val_file: Optional[str] = None
    on_bad_line: str = "error"
    max_prompt_length: Optional[int] = None
    on_long_prompt: str = "drop"
    chat_template: Optional[str] = None  # None = the tokenizer's; "nemo" | "llama3" | a Jinja string


@dataclass
class PoolConfig:
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 64  # engine slots per replica
    strategy: str = "PACK"  # placement of the replicas: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    resources: Optional[dict[str, float]] = None  # custom Ray resources per replica (pins node groups)


@dataclass
class LearnerClusterConfig:
    workers: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    strategy: str = "PACK"  # placement of the workers (STRICT_PACK keeps them on one node)
    resources: Optional[dict[str, float]] = None  # custom Ray resources per worker


@dataclass
class ClusterConfig:
    address: str = ""  # "" = start a local cluster; "auto" or host:port = connect
    num_cpus: Optional[int] = None  # local cluster only; None = enough for every pool
    generators: PoolConfig = field(default_factory=PoolConfig)
    judges: PoolConfig = field(default_factory=PoolConfig)
    learner: LearnerClusterConfig = field(default_factory=LearnerClusterConfig)
    placement_timeout_s: float = 120.0  # how long a pool's placement group may wait for resources
    wait_for_autoscaler: bool = False  # true: do not fail at once when the cluster is too small now
    max_restarts: int = 3  # per generator/judge replica; one more failure stops the run (with a checkpoint)
    health_check_interval_s: float = 30.0  # with no progress this long, ping every actor
    health_check_timeout_s: float = 60.0  # a ping (or a restarting replica) unanswered this long: hung
    refit_transport: str = "auto"  # auto | nccl | cuda_ipc | gloo | object_store: see refit_transport()


@dataclass
class EngineConfig:
    kind: str = "torch"  # actors/engines: the engine of the generators and of local judges
    options: Optional[dict[str, Any]] = None  # engine-specific, checked by the engine; None = none
    # KV-cache budget per engine replica (slots = min(cluster.<pool>.max_batch_size, budget // one sequence at
    # full context)): GB (1e9 bytes) on any device; None = the device's default: gpu_memory_fraction of the
    # GPU's total memory on CUDA, 2 GB on CPU
    kv_cache_memory_gb: Optional[float] = None
    gpu_memory_fraction: float = 0.3
    # GPUs inside one engine replica (trtllm only): its bundle holds them, so cluster.generators.num_gpus
    # (and cluster.judges.num_gpus for a local judge engine) must equal it
    tensor_parallel: int = 1


@dataclass
class LearnerConfig:
    backend: str = "torch"  # torch (data parallel) | megatron (tensor x pipeline x data parallel)
    dtype: str = "float32"
    # torch only: ddp (every rank holds the whole model) | fsdp2 (parameters, gradients and AdamW state sharded
    # over the data-parallel ranks); docs/learner_parallelism.md
    sharding: str = "ddp"
    # torch only: torch (our fused RMSNorm, transformers' rotary and SwiGLU) | liger (Liger Kernel's Triton RoPE,
    # RMSNorm and SwiGLU, in policy and reference alike; GPU, `pip install liger-kernel`) | auto (liger where it
    # can run: faster, benchmarks/NOTES.md; torch elsewhere, e.g. on CPU); megatron ignores auto
    kernels: str = "auto"
    tensor_parallel: int = 1  # megatron only: cluster.learner.workers = tensor x pipeline x data parallel
    pipeline_parallel: int = 1
    optim: OptimSchema = field(default_factory=OptimSchema)


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "selfreward"
    name: Optional[str] = None


@dataclass
class CheckpointConfig:
    keep_last: Optional[int] = None  # step checkpoints kept (newest first); None = all. Iteration ends are kept.
    # Record what the pools return before it is used, so a resumed run replays it (orchestration/rollout_journal.py):
    # auto = with an engine that does not promise batch-invariant sampling (trtllm); true; false.
    record_rollouts: str = "auto"


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    spin: SpinConfig = field(default_factory=SpinConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "outputs/self_rewarding"
    seed: int = 42
    resume: str = "auto"  # auto: continue from the newest complete checkpoint; never; or a checkpoint directory
    max_time_per_run: Optional[str] = None  # "DD:HH:MM:SS" or seconds: save and exit 0 before this wall time


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ALGORITHMS = ("self_rewarding", "meta_rewarding", "spin", "generate")
JUDGED = ("self_rewarding", "meta_rewarding")  # the algorithms that run a judge pool
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SCORE_FREE_LOSSES = ("dpo", "ipo")  # the losses that need no judge scores (SPIN has none)
CHOICES = {
    "algorithm.name": ALGORITHMS,
    "algorithm.preference_loss": ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "scale"),
    "data.on_bad_line": ("error", "skip"),
    "data.on_long_prompt": ("drop", "truncate_left"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "learner.optim.schedule": ("cosine", "constant"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "cluster.generators.strategy": PLACEMENT_STRATEGIES,
    "cluster.judges.strategy": PLACEMENT_STRATEGIES,
    "cluster.learner.strategy": PLACEMENT_STRATEGIES,
    "learner.dtype": ("float32", "bfloat16", "float16"),
    "learner.sharding": ("ddp", "fsdp2"),
    "learner.kernels": ("auto", "torch", "liger"),
    "cluster.refit_transport": ("auto", "nccl", "cuda_ipc", "gloo", "object_store"),
    "algorithm.reference_update": ("iteration", "initial"),
}


def config_dir() -> Path:
    """configs/ beside the packages (source checkout), else the installed `configs` package."""
    if CONFIG_DIR.is_dir():
        return CONFIG_DIR
    import configs

    return Path(configs.__file__).resolve().parent


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose configs/ with Hydra overrides, type-check against the schema, validate; raise ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        message = one_line(e)
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown and ("not in struct" in str(e) or "To append" in str(e)):
            message = f"unknown configuration key '{unknown.group(1)}'"
        elif unknown:
            message = f"{message} {str(e).strip().splitlines()[-1]}"
        missing = re.search(r"Could not find '([^/']+)/([^']+)'", message)
        if missing:
            group, choices = missing.group(1), group_options().get(missing.group(1), [])
            message = f"{group}={missing.group(2)} is not a known {group}: choose one of {', '.join(choices)}"
        raise ConfigError(message) from None
    return from_dict(composed)


def group_options() -> dict[str, list[str]]:
    """The config groups (configs/<group>/) and the options each offers (its YAML files)."""
    root = config_dir()
    return {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir()
            and any(d.glob("*.yaml"))}


def to_yaml(cfg: Config) -> str:
    """The whole configuration as YAML: what `--cfg job` prints and a run writes to output_dir/config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def top_level_keys() -> dict[str, list[str]]:
    """Every top-level key of the schema, with the keys inside it for a section ([] for a plain value)."""
    import dataclasses

    defaults = Config()
    return {f.name: ([g.name for g in dataclasses.fields(getattr(defaults, f.name))]
                     if dataclasses.is_dataclass(getattr(defaults, f.name)) else [])
            for f in dataclasses.fields(Config)}


def from_dict(raw: DictConfig | dict) -> Config:
    """Merge raw values into the typed schema and validate (also the Python API's entry point)."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    from learner.backends import BACKENDS

    for key, allowed in {**CHOICES, "learner.backend": tuple(BACKENDS)}.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    a = cfg.algorithm
    for key in ("num_responses_to_gen", "num_evals_to_average", "max_iterations", "max_epochs",
                "global_batch_size", "micro_batch_size", "rollout_batch_size", "max_prompts_ahead"):
        if getattr(a, key) < 1:
            raise ConfigError(f"algorithm.{key} must be >= 1, got {getattr(a, key)}")
    _validate_streaming(a)
    if a.max_steps < -1 or a.max_steps == 0:
        raise ConfigError(f"algorithm.max_steps must be -1 (no cap) or >= 1, got {a.max_steps}")
    if a.num_responses_to_gen < 2 and a.name in JUDGED:
        raise ConfigError("algorithm.num_responses_to_gen must be >= 2 to form a (chosen, rejected) pair")
    if a.name == "spin":
        _validate_spin(a)
    workers = cfg.cluster.learner.workers
    if workers < 1:
        raise ConfigError(f"cluster.learner.workers must be >= 1, got {workers}")
    data_parallel = _validate_learner_layout(cfg.learner, workers)
    if a.global_batch_size % (a.micro_batch_size * data_parallel):
        if data_parallel == workers:
            raise ConfigError(
                f"algorithm.global_batch_size={a.global_batch_size} must be divisible by "
                f"algorithm.micro_batch_size * cluster.learner.workers = {a.micro_batch_size} * {workers}")
        raise ConfigError(
            f"algorithm.global_batch_size={a.global_batch_size} must be divisible by algorithm.micro_batch_size * "
            f"data-parallel learner ranks = {a.micro_batch_size} * {data_parallel} (cluster.learner.workers={workers}"
            f" / (learner.tensor_parallel * learner.pipeline_parallel))")
    if a.preference_loss_weight == 0 and a.sft_loss_weight == 0:
        raise ConfigError("algorithm.preference_loss_weight and algorithm.sft_loss_weight are both 0: nothing to train")
    _check_per_iteration("ref_policy_kl_penalty", a.ref_policy_kl_penalty, a.max_iterations, lambda v: v > 0, "> 0")
    _check_per_iteration("length_control", a.length_control, a.max_iterations, lambda v: 0 <= v < 1, "in [0, 1)")
    for key in ("limit_train_batches", "limit_val_batches"):
        _check_limit(key, getattr(a, key))
    if not 0 < a.meta_judge_pcnt < 1:
        raise ConfigError(f"algorithm.meta_judge_pcnt must be in (0, 1), got {a.meta_judge_pcnt}")
    if not 0 < a.meta_max_relative_pcnt <= 1:
        raise ConfigError(f"algorithm.meta_max_relative_pcnt must be in (0, 1], got {a.meta_max_relative_pcnt}")
    if a.use_meta_judge and round(a.meta_judge_pcnt * a.global_batch_size) == 0:
        raise ConfigError(f"algorithm.meta_judge_pcnt={a.meta_judge_pcnt} * global_batch_size={a.global_batch_size} "
                          "rounds to 0 judge pairs per batch: raise one of them")
    for key in ("val_check_interval", "save_interval"):
        if getattr(a, key) < 1 and getattr(a, key) != -1:
            raise ConfigError(f"algorithm.{key} must be -1 (iteration ends only) or >= 1, got {getattr(a, key)}")
    for pool in ("generators", "judges"):
        if getattr(cfg.cluster, pool).replicas < 1:
            raise ConfigError(f"cluster.{pool}.replicas must be >= 1")
    if str(cfg.checkpoint.record_rollouts).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"checkpoint.record_rollouts must be auto, true or false, got {cfg.checkpoint.record_rollouts!r}")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1 or null (keep all), got {cfg.checkpoint.keep_last}")
    if cfg.cluster.max_restarts < 0:
        raise ConfigError(f"cluster.max_restarts must be >= 0, got {cfg.cluster.max_restarts}")
    if cfg.max_time_per_run is not None:
        max_seconds(cfg.max_time_per_run)
    _validate_engine(cfg)
    if a.name in JUDGED:
        _validate_judge(cfg)
    if a.name != "generate":
        refit_transport(cfg)
    if cfg.learner.optim.schedule == "cosine" and a.max_steps == -1:
        raise ConfigError("learner.optim.schedule=cosine needs algorithm.max_steps (the number of good pairs, "
                          "and so of steps, is not known in advance)")
    if cfg.judge.score_low >= cfg.judge.score_high:
        raise ConfigError(f"judge.score_low={cfg.judge.score_low} must be below judge.score_high={cfg.judge.score_high}")
    if cfg.judge.meta_temperature is not None and cfg.judge.meta_temperature < 0:
        raise ConfigError(f"judge.meta_temperature must be >= 0 (0 = greedy) or null, got {cfg.judge.meta_temperature}")
    if cfg.model.path is None and cfg.model.name != "toy":
        raise ConfigError(f"model.name={cfg.model.name!r} has no built-in model: set model.path to a Hugging Face checkpoint directory")
    if cfg.model.path is not None and not (Path(cfg.model.path).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r} is not a Hugging Face checkpoint directory (no config.json)")
    if cfg.model.path is not None and cfg.data.train_file is None:
        raise ConfigError("data.train_file is required with model.path (the toy data only fits the toy model)")
    if cfg.model.path is None:
        _validate_toy(cfg)


def _validate_toy(cfg: Config) -> None:
    t = cfg.model.toy
    if not 0.0 <= t.answer_target <= 1.0:
        raise ConfigError(f"model.toy.answer_target={t.answer_target} is a greedy accuracy: between 0 and 1")
    if t.answer_steps < 1:
        raise ConfigError(f"model.toy.answer_steps={t.answer_steps}: the answer phase needs at least one step")
    if cfg.algorithm.use_meta_judge and t.meta_judgements is not None and t.meta_judgements < 1:
        raise ConfigError("model.toy.meta_judgements=0 leaves the toy model without a meta-judge, which "
                          "Meta-Rewarding (algorithm.use_meta_judge=true) asks it to be")


def _validate_engine(cfg: Config) -> None:
    """engine.kind is registered and takes engine.options (checked by the engine class, nothing built)."""
    from actors.engines import ENGINES, EngineSpec, engine_class

    if cfg.engine.kind not in ENGINES:
        raise ConfigError(f"engine.kind={cfg.engine.kind!r} is not one of: {', '.join(ENGINES)}")
    tp = cfg.engine.tensor_parallel
    # trtllm's ranks (even one) are GPU workers, one GPU each, in their replica's bundles (the torch engine
    # runs in its host actor and refuses tensor_parallel > 1 itself, below).
    if cfg.engine.kind == "trtllm":
        from actors.judges import JUDGE_BACKENDS

        pools = {"cluster.generators": cfg.cluster.generators}
        entry = JUDGE_BACKENDS.get(cfg.judge.backend)
        if cfg.algorithm.name in JUDGED and entry is not None and entry.local_engine:
            pools["cluster.judges"] = cfg.cluster.judges
        for key, pool in pools.items():
            if pool.num_gpus != tp:
                raise ConfigError(f"engine.kind={cfg.engine.kind} with engine.tensor_parallel={tp} runs {tp} GPU "
                                  f"worker(s) per engine replica, but {key}.num_gpus={pool.num_gpus:g}: set it to {tp}")
            # Each rank's bundle gets the pool's num_cpus; its worker holds one CPU (Ray's default for an
            # actor that asks for a GPU), so a bundle with less never places it.
            if pool.num_cpus < 1:
                raise ConfigError(f"engine.kind={cfg.engine.kind}: each GPU worker holds one CPU of its bundle, but "
                                  f"{key}.num_cpus={pool.num_cpus:g}: set it to at least 1")
    try:
        spec = EngineSpec("", kind=cfg.engine.kind, options=dict(cfg.engine.options or {}),
                          kv_cache_memory_gb=cfg.engine.kv_cache_memory_gb,
                          gpu_memory_fraction=cfg.engine.gpu_memory_fraction,
                          tensor_parallel=cfg.engine.tensor_parallel)  # their ranges: EngineSpec
        engine_class(cfg.engine.kind).check_spec(spec)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None


def _validate_judge(cfg: Config) -> None:
    """The judge backend exists and can do what the algorithm asks; its templates resolve with their slots."""
    from actors.judges import judge_backend

    from . import judge_templates

    try:
        entry = judge_backend(cfg.judge.backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    judge_templates.resolve("judge.template", cfg.judge.template)
    _validate_judge_patterns(cfg.judge)
    if cfg.judge.backend == "model":
        _validate_judge_model(cfg.judge.model)
    if cfg.judge.backend == "triton":
        _validate_judge_triton(cfg.judge.triton)
    _validate_default_verifier(cfg.judge)
    if cfg.algorithm.use_meta_judge:
        if not entry.can_meta_judge:
            raise ConfigError(f"judge.backend={cfg.judge.backend} cannot meta-judge, which algorithm.use_meta_judge="
                              "true (Meta-Rewarding) needs")
        judge_templates.resolve("judge.meta_template", cfg.judge.meta_template)


def _validate_default_verifier(j: JudgeConfig) -> None:
    from actors.verifiers import VERIFIERS

    if j.default_verifier is None:
        return
    if j.backend != "verifier":
        raise ConfigError(f"judge.default_verifier={j.default_verifier!r} applies to judge.backend=verifier only; with "
                          f"judge.backend={j.backend} a sample is verifier-scored when its metadata names a verifier "
                          "(key 'verifier'), and judged otherwise")
    if j.default_verifier not in VERIFIERS:
        raise ConfigError(f"judge.default_verifier={j.default_verifier!r} is not one of: {', '.join(VERIFIERS)}")


def _validate_judge_patterns(j: JudgeConfig) -> None:
    """judge.score_match is first or last; the score and verdict patterns are regular expressions."""
    from actors.judges.parsing import SCORE_MATCHES

    if j.score_match not in SCORE_MATCHES:
        raise ConfigError(f"judge.score_match={j.score_match!r} is not one of: {', '.join(SCORE_MATCHES)} (which match "
                          "of judge.reward_regex and judge.meta_reward_regex counts)")
    for key in ("reward_regex", "meta_reward_regex"):
        try:
            re.compile(getattr(j, key))
        except re.error as e:
            raise ConfigError(f"judge.{key}={getattr(j, key)!r} is not a regular expression: {e}") from None


def _validate_judge_model(m: JudgeModelConfig) -> None:
    if m.path is None:
        raise ConfigError("judge.backend=model needs judge.model.path, a Hugging Face checkpoint directory (with "
                          "model=toy, the toy world's M1: its directory is logged as '[toy] M1 at ...')")
    if not (Path(m.path).expanduser() / "config.json").is_file():
        raise ConfigError(f"judge.model.path={m.path!r} is not a Hugging Face checkpoint directory (no config.json)")
    if m.dtype is not None and m.dtype not in CHOICES["model.dtype"]:
        raise ConfigError(f"judge.model.dtype={m.dtype!r} is not one of: {', '.join(CHOICES['model.dtype'])}")
    if m.max_seq_len is not None and m.max_seq_len < 2:
        raise ConfigError(f"judge.model.max_seq_len={m.max_seq_len} leaves no room for a prompt and a judgement")
    _check_chat_template("judge.model.chat_template", m.chat_template)


def _validate_judge_triton(t: JudgeTritonConfig) -> None:
    from actors.judges.triton import TritonSpec

    try:
        TritonSpec(url=t.url, protocol=t.protocol, model_name=t.model_name, timeout_s=t.timeout_s,
                   retries=t.retries, retry_backoff_s=t.retry_backoff_s, concurrency=t.concurrency)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_chat_template("judge.triton.chat_template", t.chat_template)


def _check_chat_template(key: str, value: Optional[str]) -> None:
    """A preset name or a Jinja string (a bare word that is neither is a typo)."""
    from .chat import PRESETS

    if value is not None and value not in PRESETS and "{{" not in value and "{%" not in value:
        raise ConfigError(f"{key}={value!r} is not a chat template preset ({', '.join(sorted(PRESETS))}) or a "
                          "Jinja template string")


def _validate_learner_layout(learner: LearnerConfig, workers: int) -> int:
    """Check the learner's parallel layout; returns the number of data-parallel ranks."""
    tp, pp = learner.tensor_parallel, learner.pipeline_parallel
    for key, value in (("tensor_parallel", tp), ("pipeline_parallel", pp)):
        if value < 1:
            raise ConfigError(f"learner.{key} must be >= 1, got {value}")
    if learner.backend == "torch":
        if tp * pp > 1:
            raise ConfigError(f"learner.tensor_parallel={tp} and learner.pipeline_parallel={pp} need "
                              "learner.backend=megatron (the torch backend is data parallel only)")
        return workers
    if learner.sharding != "ddp":
        raise ConfigError(f"learner.sharding={learner.sharding} is an option of learner.backend=torch; megatron "
                          "shards its optimizer state over data-parallel ranks itself (docs/megatron.md)")
    if learner.kernels == "liger":
        raise ConfigError(f"learner.kernels={learner.kernels} is an option of learner.backend=torch; megatron "
                          "runs its own fused kernels (docs/megatron.md)")
    from learner.backends import megatron

    if not megatron.available():
        raise ConfigError(f"learner.backend=megatron needs megatron-core, which is not installed: "
                          f"{megatron.INSTALL_HINT}")
    if learner.dtype == "float16":
        raise ConfigError("learner.dtype=float16 is not supported with learner.backend=megatron: "
                          "use bfloat16 or float32")
    if workers % (tp * pp):
        raise ConfigError(f"cluster.learner.workers={workers} must be divisible by learner.tensor_parallel * "
                          f"learner.pipeline_parallel = {tp} * {pp}")
    return workers // (tp * pp)


def _validate_spin(a: AlgorithmConfig) -> None:
    if a.preference_loss not in SCORE_FREE_LOSSES:
        raise ConfigError(f"algorithm.preference_loss={a.preference_loss!r} needs judge scores, which SPIN does not "
                          f"have: use one of {', '.join(SCORE_FREE_LOSSES)}")
    for key in ("first_iteration_sft", "use_meta_judge"):
        if getattr(a, key):
            raise ConfigError(f"algorithm.{key}=true is a Self-Rewarding option; SPIN trains on the "
                              "ground-truth answers from the first iteration")


def _validate_streaming(a: AlgorithmConfig) -> None:
    if a.refit_every_steps is not None and (isinstance(a.refit_every_steps, bool) or a.refit_every_steps < 1):
        raise ConfigError(f"algorithm.refit_every_steps must be null (iteration boundaries only) or >= 1, "
                          f"got {a.refit_every_steps}")
    if a.max_policy_lag is not None:
        if a.max_policy_lag < 0:
            raise ConfigError(f"algorithm.max_policy_lag must be null (no bound) or >= 0, got {a.max_policy_lag}")
        if a.refit_every_steps is None:
            raise ConfigError("algorithm.max_policy_lag bounds the lag of streaming refits: it needs "
                              "algorithm.refit_every_steps (without it every pair is trained at lag 0)")


def refit_transport(cfg: Config) -> str:
    """cluster.refit_transport with `auto` resolved: nccl when the learner and every engine pool that follows
    the policy hold at least one whole GPU per worker or replica (NCCL needs a GPU of its own for each rank of
    the refit group); cuda_ipc when they all hold a share of a GPU and some hold less than one (the one-GPU
    layout; the driver falls back to object_store when a replica turns out to be on another GPU than learner
    rank 0); else (a pool on the CPU) object_store. `gloo` is the collective path on CPU (tests, CPU clusters).
    A judge that does not follow the policy is never refit, so its GPUs do not count."""
    c = cfg.cluster
    pools = {"cluster.learner.num_gpus": c.learner.num_gpus, "cluster.generators.num_gpus": c.generators.num_gpus}
    if cfg.algorithm.name in JUDGED and judge_follows_policy(cfg):
        pools["cluster.judges.num_gpus"] = c.judges.num_gpus
    short = [f"{key}={value:g}" for key, value in pools.items() if value < 1]
    if c.refit_transport == "auto":
        if not short:
            return "nccl"
        return "cuda_ipc" if all(value > 0 for value in pools.values()) else "object_store"
    if c.refit_transport == "nccl" and short:
        raise ConfigError(f"cluster.refit_transport=nccl needs a whole GPU per learner worker and engine replica "
                          f"(NCCL cannot put two ranks on one GPU), but {', '.join(short)}: give them GPUs, or "
                          "use cluster.refit_transport=object_store")
    if c.refit_transport == "cuda_ipc":
        cpu = [key for key, value in pools.items() if value == 0]
        if cpu:
            raise ConfigError(f"cluster.refit_transport=cuda_ipc copies between pools on one GPU, but "
                              f"{', '.join(f'{k}=0' for k in cpu)}: give them (a share of) the GPU, e.g. 0.3 each")
        if cfg.engine.kind != "torch":
            raise ConfigError(f"cluster.refit_transport=cuda_ipc is built for engine.kind=torch, not "
                              f"{cfg.engine.kind!r} (its rank workers refit over nccl)")
    return c.refit_transport


def judge_follows_policy(cfg: Config) -> bool:
    from actors.judges import JUDGE_BACKENDS

    entry = JUDGE_BACKENDS.get(cfg.judge.backend)
    return entry is None or entry.follows_policy


def max_seconds(value: str | None) -> float | None:
    """max_time_per_run in seconds: "DD:HH:MM:SS" (or a shorter tail of it, "HH:MM:SS") or a number."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        if ":" not in text:
            seconds = float(text)
        else:
            parts = [float(p) for p in text.split(":")]
            if len(parts) > 4:
                raise ValueError
            seconds = sum(p * m for p, m in zip(reversed(parts), (1, 60, 3600, 86400)))
    except ValueError:
        raise ConfigError(f"max_time_per_run={value!r} is not \"DD:HH:MM:SS\", \"HH:MM:SS\" or a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"max_time_per_run={value!r} must be positive")
    return seconds


def per_iteration(value: Any, iteration: int) -> float:
    """The value of a per-iteration knob (a number, or a list with one entry per iteration)."""
    return float(value[iteration]) if isinstance(value, (list, tuple)) else float(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_per_iteration(key: str, value: Any, iterations: int, ok, wanted: str) -> None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) < iterations:
        raise ConfigError(f"algorithm.{key} has {len(values)} value(s) {values} but algorithm.max_iterations="
                          f"{iterations}: give one per iteration, or a single number")
    for v in values:
        if not _is_number(v) or not ok(v):
            raise ConfigError(f"algorithm.{key} must be a number {wanted} or a list of them, got {value!r}")


def _check_limit(key: str, value: Any) -> None:
    if isinstance(value, bool) or not _is_number(value):
        raise ConfigError(f"algorithm.{key} must be a fraction (float in (0, 1]) or a count (int >= 1), got {value!r}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ConfigError(f"algorithm.{key}={value} as a fraction must be in (0, 1]")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"algorithm.{key}={value} as a count must be >= 1")


def limited(count: int, limit: Any, batch: int) -> int:
    """How many of `count` items a limit keeps: a fraction of them, or `limit` batches of `batch` items."""
    if isinstance(limit, float):
        return max(1, round(count * limit)) if count else 0
    return min(count, limit * batch)


def _get(cfg: Config, dotted: str):
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    if "not in struct" in msg or ("Key '" in msg and "not" in msg):
        return f"unknown configuration key '{key}'" if key else msg
    return f"{key}: {msg}" if key else msg

