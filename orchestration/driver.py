"""The driver API: build a config, run it, get the result. The CLI (orchestration.main) is a thin layer on it.

    from orchestration import load_config, run
    result = run(load_config(["algorithm.max_iterations=1", "output_dir=/tmp/sr"]))
    print(result.iterations, result.checkpoints)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from omegaconf import OmegaConf
from ray.exceptions import RayError

from actors.engines import EngineSpec, context_length, engine_class
from actors.judges.llm import vocab_digest
from actors.judges.protocol import JudgeSpec
from actors.judges.triton import RemoteJudgeFailed, TritonSpec, probe
from learner.group import LearnerSpec
from learner.types import OptimConfig

from .algorithms.generate import BatchGeneration, open_output, output_path, settings as generation_settings
from .algorithms.self_rewarding import SelfRewarding
from .algorithms.spin import Spin
from .chat import PRESET_STOP_STRINGS, PRESETS, ChatRenderer
from .checkpoint import Checkpoint, Checkpoints
from . import judge_templates
from .cluster import JudgePoolSpec, Pools, connect, start_pools
from .config import (JUDGED, Config, ConfigError, judge_follows_policy, max_seconds, refit_transport, sampling_params,
                     to_yaml)
from .errors import PoolFailed, RunFailed, one_line
from .context import RunContext
from .data import JsonlDataset
from .metrics import MetricsLogger
from .ipc_refit import IpcUnavailable, use_cuda_ipc
from .refit import COLLECTIVE_BACKENDS, use_collective
from .resumable_output import ResumableJsonl
from .rollout_journal import JOURNAL_DIR, RolloutJournal, rollout_fingerprint
from .stopping import StopRequested, Stopper
from .report import format_table

COMPLETE_MARKER = "run_complete.json"
TOY_META_JUDGEMENTS = 1500  # meta-judge bootstrap examples when the meta-judge is on


@dataclass
class RunResult:
    output_dir: Path
    checkpoints: list[Path]
    iterations: list[dict]  # one row per iteration (and a final row with the final model's accuracy)
    metrics_file: Path
    seconds: float
    stopped: str | None = None  # why the run stopped cleanly before its end (it resumes from its checkpoint)
    generation: dict | None = None  # algorithm=generate: its summary (output file, counts, tokens/s)


def run(cfg: Config, log=print) -> RunResult:
    """Run (or resume) the configured algorithm. Raises ConfigError/DataError on bad input and RunFailed
    when an actor failure stops the run; a clean stop returns a result with `stopped` set."""
    if cfg.algorithm.name == "generate":
        return _run_generation(cfg, log)
    start = time.perf_counter()
    stopper = Stopper(max_seconds(cfg.max_time_per_run))
    stopper.install()  # from here a SIGTERM or Ctrl-C is a request, acted on at the next safe point
    try:
        return _run(cfg, log, start, stopper)
    finally:
        stopper.uninstall()


def set_up_refits(cfg: Config, pools: Pools, log: Callable[[str], None]) -> str:
    """Switch `pools` to the refit transport the configuration asks for (config.refit_transport) and return
    its name. `auto`'s cuda_ipc falls back to the object store when a replica is not on learner rank 0's GPU
    (fractional GPU shares on a host of several GPUs); asked for by name, that stops the run."""
    transport = refit_transport(cfg)
    if transport in COLLECTIVE_BACKENDS:
        use_collective(pools, transport)
    elif transport == "cuda_ipc":
        try:
            use_cuda_ipc(pools)
        except IpcUnavailable as e:
            if cfg.cluster.refit_transport != "auto":
                raise
            log(f"[run] cuda_ipc refits are not possible here ({e}): using the object store")
            transport = "object_store"
    return transport


def _journal(cfg: Config, out: Path, log) -> RolloutJournal | None:
    """checkpoint.record_rollouts: auto records with an engine that does not promise batch-invariant sampling
    (a resumed run would otherwise get other samples for the prompts it generates again)."""
    wanted = str(cfg.checkpoint.record_rollouts).lower()
    if wanted == "auto":
        wanted = "false" if getattr(engine_class(cfg.engine.kind), "BATCH_INVARIANT", True) else "true"
    if wanted != "true":
        return None
    log(f"[run] recording what the pools return in {out / JOURNAL_DIR} (checkpoint.record_rollouts), so a "
        "resumed run replays it")
    return RolloutJournal(out, rollout_fingerprint(cfg), log)


def _run(cfg: Config, log, start: float, stopper: Stopper) -> RunResult:
    out = Path(cfg.output_dir).expanduser().resolve()
    marker = out / COMPLETE_MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        log(f"[run] {out} holds a finished run; nothing to do.\n{format_table(done['iterations'])}")
        return _result(out, done["iterations"], done["seconds"])
    checkpoints = Checkpoints(out, cfg.checkpoint.keep_last)
    resume = _resume_point(cfg, out, checkpoints, log)
    # SPIN's chosen responses and first_iteration_sft's targets are the dataset's answers.
    try:
        setup = _prepare(cfg, log, require_answer=cfg.algorithm.name == "spin" or cfg.algorithm.first_iteration_sft,
                         stop=stopper.requested)
    except StopRequested as e:  # only the toy bootstrap asks: it left nothing behind
        log(f"[run] stopped cleanly ({e.reason}); the toy world was not cached. Run the same command again to "
            "build it from the start.")
        return RunResult(out, [], [], out / "metrics.jsonl", time.perf_counter() - start, stopped=e.reason)
    if cfg.learner.backend == "megatron":  # before Ray and wandb start: a bad layout leaves nothing behind
        _check_megatron_layout(str(resume.path) if resume else str(setup.model_dir), cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))

    judged = cfg.algorithm.name in JUDGED
    started_ray = connect(cfg.cluster, judges=judged)
    stopper.install()  # again: ray.init replaced the SIGTERM handler with its own
    stale = resume is None and (out / "metrics.jsonl").exists()  # a run that stopped before its first checkpoint
    metrics = MetricsLogger(out, cfg.logger.wandb.mode, cfg.logger.wandb.project, cfg.logger.wandb.name,
                            OmegaConf.to_container(OmegaConf.structured(cfg)),
                            resume_sizes=resume.state["metrics_bytes"] if resume else ({} if stale else None), log=log)
    pools = None
    try:
        log(f"[run] starting pools: {cfg.cluster.generators.replicas} generator(s), "
            f"{cfg.cluster.judges.replicas if judged else 0} judge(s), {cfg.cluster.learner.workers} learner worker(s)")
        weights = _weights(setup.model_dir, resume, cfg.algorithm.reference_update)
        gen_engine, judges, learner = _specs(cfg, weights, setup.renderer.stop_strings)
        if judged and cfg.judge.backend == "triton":
            try:  # before the pools: a remote judge that is not there stops the run with its URL, not Ray's trace
                probe(*judges.backend_args)
            except RemoteJudgeFailed as e:
                raise PoolFailed(str(e)) from None
        pools = start_pools(cfg.cluster, gen_engine, judges if judged else None, learner, log=log)
        if judged and cfg.judge.backend in ("model", "triton"):
            _check_fixed_judge(cfg, pools, setup.tokenizer, log)
        log(f"[run] weight refits: {set_up_refits(cfg, pools, log)}")
        if resume is not None and resume.state["phase"] == "end" and cfg.algorithm.reset_optimizer_each_iteration:
            pools.learner.reset_optimizer()  # the boundary after an iteration-end checkpoint
        for ds, name in ((setup.train, "train"), (setup.val, "val")):
            if ds is not None and ds.num_bad_lines:
                metrics.log({f"data/{name}_bad_lines": ds.num_bad_lines}, 0)
        ctx = _context(cfg, setup, metrics, log)
        algorithm = (Spin if cfg.algorithm.name == "spin" else SelfRewarding)(
            cfg, ctx, pools, checkpoints=checkpoints, reference_dir=str(setup.model_dir), stopper=stopper,
            resume=resume, journal=_journal(cfg, out, log))
        summaries = algorithm.run()
        if ctx.long_prompts:
            metrics.log({"data/long_prompts_dropped": len(ctx.long_prompts)}, algorithm.step)
    except StopRequested as e:
        log(f"[run] stopped cleanly ({e.reason}); checkpoint {e.checkpoint}. Run the same command again to "
            "continue from it.")
        return RunResult(out, [], [], out / "metrics.jsonl", time.perf_counter() - start, stopped=e.reason)
    except (PoolFailed, RayError) as e:
        latest = checkpoints.latest()
        where = f"the last complete checkpoint is {latest.path}" if latest else "no checkpoint was completed yet"
        raise RunFailed(f"the run stopped: {_failure(e)}. {where}; run the same command again to resume "
                        f"{'from it' if latest else 'from the start'}.") from None
    finally:
        if pools is not None:
            pools.shutdown()
        metrics.close()
        if started_ray:
            ray.shutdown()
    rows = [s.row() for s in summaries]
    seconds = time.perf_counter() - start
    log(format_table(rows))
    if setup.toy_report:
        log(f"[toy] bootstrap M1 report: {json.dumps(setup.toy_report)}")
    marker.write_text(json.dumps({"iterations": rows, "seconds": seconds}, indent=2))
    log(f"[run] finished in {seconds:.0f}s; outputs in {out}")
    return _result(out, rows, seconds)


def _check_fixed_judge(cfg: Config, pools, policy_tokenizer, log) -> None:
    """Log which fixed judge model scores the run. Meta-Rewarding trains the policy on the judge's own judgements
    (judge pairs, in the judge's tokens), so there the judge must share the policy's vocabulary."""
    where = cfg.judge.model.path if cfg.judge.backend == "model" else f"{cfg.judge.triton.protocol}://{cfg.judge.triton.url}"
    log(f"[run] judge: {cfg.judge.backend} at {where}, fixed (never refit; its judgements' version is 'fixed')")
    if cfg.algorithm.use_meta_judge:
        digest = ray.get(pools.judges.call(0, "vocab_digest"))
        if digest != vocab_digest(policy_tokenizer):
            raise ConfigError(f"algorithm.use_meta_judge=true trains the policy on the judge's judgements, but the "
                              f"judge at {where} (judge.backend={cfg.judge.backend}) has another vocabulary than "
                              "the policy: use a judge with the policy's tokenizer, or Self-Rewarding")


def _failure(error: Exception) -> str:
    """What failed, in one line: our own message for a PoolFailed, a Ray error's type and last line."""
    return str(error) if isinstance(error, PoolFailed) else f"{type(error).__name__}: {one_line(error)}"


def _resume_point(cfg: Config, out: Path, checkpoints: Checkpoints, log) -> Checkpoint | None:
    """The checkpoint this run continues from (resume=auto: the newest complete one), or None."""
    if cfg.resume not in ("auto", "never"):
        found = Checkpoints.named(cfg.resume)
        log(f"[run] resuming from {found.path} (step {found.state['step']}, iteration {found.state['iteration']})")
        return found
    unfinished = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if cfg.resume == "never":
        if unfinished:
            raise ConfigError(f"output_dir={str(out)!r} holds an unfinished run and resume=never: choose another "
                              "output_dir, delete that one, or resume=auto to continue it")
        return None
    removed = checkpoints.recover()
    if removed:
        log(f"[run] removed incomplete checkpoint files left by a crash: {', '.join(removed)}")
    found = checkpoints.latest()
    if found is not None:
        log(f"[run] resuming from {found.path} (step {found.state['step']}, iteration {found.state['iteration']}, "
            f"{'end of the iteration' if found.state['phase'] == 'end' else 'inside the iteration'})")
    elif unfinished:
        log(f"[run] {out} holds a run that stopped before its first checkpoint: starting from the beginning")
    return found


@dataclass(frozen=True)
class _Weights:
    """Where each side's starting weights come from (a fresh run: all the input model)."""

    policy: str
    reference: str | None = None  # None: a copy of the policy
    learner_state: str | None = None  # a checkpoint with optimizer, schedule and RNG states
    engines: str = ""
    version: int = 0


def _weights(model_dir: Path, resume: Checkpoint | None, reference_update: str = "iteration") -> _Weights:
    if resume is None:
        return _Weights(str(model_dir), engines=str(model_dir))
    st, path = resume.state, str(resume.path)
    if st["phase"] == "end":  # past the boundary: M_{t+1} is policy, reference and what the pools serve
        # (algorithm.reference_update=initial: the reference stays the one the checkpoint names)
        reference = None if reference_update == "iteration" else st["reference"]
        return _Weights(path, reference, path, path, st["weight_version"] + 1)
    return _Weights(path, st["reference"], path, st["reference"], st["weight_version"])


def _run_generation(cfg: Config, log) -> RunResult:
    """algorithm=generate: the output file itself is the job's state (a rerun resumes it)."""
    start = time.perf_counter()
    out = Path(cfg.output_dir).expanduser().resolve()
    setup = _prepare(cfg, log, require_answer=False)
    output = ResumableJsonl(output_path(cfg), generation_settings(cfg, setup.model_dir))
    start_at = open_output(output, len(setup.train), log)
    if start_at == len(setup.train):
        output.close()
        log(f"[generate] {output.path} is complete ({start_at} prompts); nothing to do")
        return RunResult(out, [], [], out / "metrics.jsonl", time.perf_counter() - start,
                         generation={"output_file": str(output.path), "prompts": start_at, "resumed_at": start_at})
    started_ray = connect(cfg.cluster, judges=False, learner=False)
    pools = None
    try:
        log(f"[run] starting {cfg.cluster.generators.replicas} generator(s)")
        gen_engine = _engine_specs(cfg, _weights(setup.model_dir, None))[0]
        pools = start_pools(cfg.cluster, gen_engine, log=log)
        ctx = _context(cfg, setup, None, log)
        summary = BatchGeneration(cfg, ctx, pools, output).run(start_at)
    except (PoolFailed, RayError) as e:
        raise RunFailed(f"the generation job stopped: {_failure(e)}. {output.path} keeps every complete line; "
                        "run the same command again to continue after the last one.") from None
    finally:
        output.close()
        if pools is not None:
            pools.shutdown()
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - start
    log(f"[generate] {summary.prompts} prompts in {output.path} ({summary.generated_prompts} generated now, "
        f"{summary.responses} responses, {summary.unended} unended"
        + (f", {summary.dropped_unended} of them left out (generation.keep_unended=false)"
           if summary.dropped_unended else "")
        + (f", {summary.skipped_prompts} prompts too long, written with no responses" if summary.skipped_prompts
           else "")
        + (f"; {summary.tokens / summary.seconds:.0f} tokens/s" if summary.seconds else "") + ")")
    return RunResult(out, [], [], out / "metrics.jsonl", seconds, generation=summary.as_dict())


@dataclass
class _Setup:
    train: JsonlDataset
    val: JsonlDataset | None
    model_dir: Path
    evaluator_factory: object
    toy_report: dict | None
    tokenizer: object
    renderer: ChatRenderer


def _prepare(cfg: Config, log, *, require_answer: bool, stop=None) -> _Setup:
    """Data, model and tokenizer. The user's data is read first: a broken file fails before a model is built."""
    train = _open(cfg.data.train_file, cfg, require_answer=require_answer, log=log)
    val = _open(cfg.data.val_file, cfg, require_answer=True, log=log)
    model_dir, toy_files, evaluator_factory, toy_report = _resolve_model(cfg, log, stop)
    if train is None:
        train = _open(toy_files[0], cfg, require_answer=require_answer, log=log)
    if val is None and toy_files:
        val = _open(toy_files[1], cfg, require_answer=True, log=log)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _Setup(train, val, model_dir, evaluator_factory, toy_report, tokenizer,
                  ChatRenderer(tokenizer, cfg.data.chat_template))


def _context(cfg: Config, setup: _Setup, metrics: MetricsLogger | None, log) -> RunContext:
    evaluator = setup.evaluator_factory(setup.renderer) if setup.evaluator_factory else None
    return RunContext(setup.tokenizer, setup.renderer, setup.train, setup.val, metrics,
                      _max_prompt_length(cfg, setup.model_dir), cfg.data.on_long_prompt,
                      normalise_prompt=cfg.algorithm.normalise_prompt, evaluator=evaluator, log=log)


def _max_prompt_length(cfg: Config, model_dir: Path) -> int:
    """data.max_prompt_length, never more than the engines can take (context minus one new token)."""
    limit = context_length(str(model_dir), cfg.model.max_seq_len) - 1
    return min(limit, cfg.data.max_prompt_length) if cfg.data.max_prompt_length else limit


def _result(out: Path, rows: list[dict], seconds: float) -> RunResult:
    checkpoints = [Path(r["checkpoint"]) for r in rows if r.get("checkpoint")]
    return RunResult(out, checkpoints, rows, out / "metrics.jsonl", seconds)


def _open(path, cfg: Config, *, require_answer: bool, log) -> JsonlDataset | None:
    if path is None:
        return None
    ds = JsonlDataset(path, on_bad_line=cfg.data.on_bad_line, require_answer=require_answer)
    if ds.num_bad_lines:
        line, reason = ds.bad_lines[0]
        log(f"[data] {path}: skipped {ds.num_bad_lines} bad line(s) (data.on_bad_line=skip); first: "
            f"line {line}: {reason}")
    if len(ds) == 0:
        raise ConfigError(f"{path}: no usable conversation in the file")
    return ds


def _resolve_model(cfg: Config, log, stop=None):
    """(model dir, toy (train, val) files or (), evaluator factory or None, toy bootstrap report or None)."""
    if cfg.model.path is not None:
        if cfg.model.name == "toy":
            raise ConfigError("model.path is set while model=toy is selected (its hyper-parameters are sized for "
                              "the toy model): add model=hf to the command line")
        return Path(cfg.model.path).expanduser(), (), None, None
    from .toy import world as toy_world
    from .toy.evaluate import ToyEvaluator

    t = cfg.model.toy
    recipe = toy_world.ToyRecipe(seed=cfg.seed if t.seed is None else t.seed, max_operand=t.max_operand,
                                 train_prompts=t.train_prompts, val_prompts=t.val_prompts, bootstrap_steps=t.bootstrap_steps,
                                 bootstrap_lr=t.bootstrap_lr, meta_judgements=_toy_meta_judgements(cfg),
                                 answer_target=t.answer_target, answer_steps=t.answer_steps, device=t.device)
    toy = toy_world.prepare(recipe, t.cache_dir, log, stop)
    log(f"[toy] M1 at {toy.model_dir}: answer accuracy {toy.report['answer_accuracy']:.1%}, judge parse rate "
        f"{toy.report['judge_parse_rate']:.1%}, judge accuracy {toy.report['judge_accuracy']:.1%}")

    def evaluator(renderer: ChatRenderer):
        j = cfg.judge
        sampling = sampling_params(j.sampling.resolve(cfg.algorithm.sampling), renderer.stop_strings)
        return ToyEvaluator(renderer, JsonlDataset(toy.val_file),
                            judge_template=judge_templates.resolve("judge.template", j.template),
                            judge_sampling=sampling, score_regex=j.reward_regex, score_match=j.score_match,
                            score_range=(j.score_low, j.score_high))

    return toy.model_dir, (toy.train_file, toy.val_file), evaluator, toy.report


def _toy_meta_judgements(cfg: Config) -> int:
    if cfg.model.toy.meta_judgements is not None:
        return cfg.model.toy.meta_judgements
    return TOY_META_JUDGEMENTS if cfg.algorithm.use_meta_judge else 0


def _engine_specs(cfg: Config, weights: _Weights) -> tuple[EngineSpec, EngineSpec]:
    """The generator and judge engines: the weights the pools start from, each on its pool's device."""
    c = cfg.cluster
    engine = dict(model_dir=weights.engines, dtype=cfg.model.dtype, max_seq_len=cfg.model.max_seq_len,
                  weight_version=weights.version, kind=cfg.engine.kind, options=dict(cfg.engine.options or {}),
                  kv_cache_memory_gb=cfg.engine.kv_cache_memory_gb, gpu_memory_fraction=cfg.engine.gpu_memory_fraction,
                  tensor_parallel=cfg.engine.tensor_parallel)
    return (EngineSpec(**engine, device="cuda" if c.generators.num_gpus > 0 else "cpu",
                       max_batch_size=c.generators.max_batch_size),
            EngineSpec(**engine, device="cuda" if c.judges.num_gpus > 0 else "cpu",
                       max_batch_size=c.judges.max_batch_size))


def _judge_backend_specs(cfg: Config, judge_engine: EngineSpec, end_of_turn: tuple[str, ...]):
    """(judge engine or None, judge chat template or None, the judge's end-of-turn stop strings, the backend's
    own arguments) for judge.backend. The policy judges with the data's chat template; a fixed judge model
    with its own (judge.model.chat_template, else its tokenizer's), on its own weights at version 0."""
    j = cfg.judge
    if j.backend == "verifier":  # no model: nothing to load, no weights to track
        return None, None, end_of_turn, ()
    if j.backend not in ("model", "triton"):
        template = cfg.data.chat_template
        return judge_engine, PRESETS.get(template, template) if template else None, end_of_turn, ()
    template = j.model.chat_template if j.backend == "model" else j.triton.chat_template
    chat_template = PRESETS.get(template, template) if template else None
    stops = PRESET_STOP_STRINGS.get(template, ()) if template else ()
    if j.backend == "model":
        engine = dataclasses.replace(judge_engine, model_dir=str(Path(j.model.path).expanduser().resolve()),
                                     dtype=j.model.dtype or cfg.model.dtype, weight_version=0,
                                     max_seq_len=j.model.max_seq_len or cfg.model.max_seq_len)
        return engine, chat_template, stops, ()
    t = j.triton
    remote = TritonSpec(url=t.url, protocol=t.protocol, model_name=t.model_name, timeout_s=t.timeout_s,
                        retries=t.retries, retry_backoff_s=t.retry_backoff_s, concurrency=t.concurrency)
    return None, chat_template, stops, (remote,)


def _specs(cfg: Config, weights: _Weights, end_of_turn: tuple[str, ...]):
    c = cfg.cluster
    gen_engine, judge_engine = _engine_specs(cfg, weights)
    judge_engine, chat_template, judge_stops, backend_args = _judge_backend_specs(cfg, judge_engine, end_of_turn)
    meta_template = None
    if cfg.algorithm.use_meta_judge:
        meta_template = judge_templates.resolve("judge.meta_template", cfg.judge.meta_template)
    judge = JudgeSpec(template=judge_templates.resolve("judge.template", cfg.judge.template),
                      meta_template=meta_template, meta_reward_regex=cfg.judge.meta_reward_regex,
                      meta_max_new_tokens=cfg.judge.meta_max_new_tokens, meta_temperature=cfg.judge.meta_temperature,
                      sampling=sampling_params(cfg.judge.sampling.resolve(cfg.algorithm.sampling), judge_stops),
                      reward_regex=cfg.judge.reward_regex, score_match=cfg.judge.score_match,
                      score_low=cfg.judge.score_low, score_high=cfg.judge.score_high, chat_template=chat_template,
                      follows_policy=judge_follows_policy(cfg))
    o = cfg.learner.optim
    optim = OptimConfig(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                        warmup_steps=o.warmup_steps, schedule=o.schedule, decay_steps=_decay_steps(cfg),
                        max_grad_norm=o.max_grad_norm, micro_batch_size=cfg.algorithm.micro_batch_size)
    learner = LearnerSpec(model_dir=weights.policy, optim=optim, workers=c.learner.workers,
                          num_cpus=c.learner.num_cpus, num_gpus=c.learner.num_gpus, dtype=cfg.learner.dtype,
                          seed=cfg.seed, backend=cfg.learner.backend, reference_dir=weights.reference,
                          resume_dir=weights.learner_state, options=_learner_options(cfg))
    return gen_engine, JudgePoolSpec(cfg.judge.backend, judge, judge_engine, backend_args), learner


def _learner_options(cfg: Config) -> dict:
    """The learner backend's own options (config.validate refused tensor/pipeline parallel for torch, and
    sharding and kernels for megatron)."""
    if cfg.learner.backend == "megatron":
        return {"tensor_parallel": cfg.learner.tensor_parallel, "pipeline_parallel": cfg.learner.pipeline_parallel}
    return {"sharding": cfg.learner.sharding, "kernels": cfg.learner.kernels}


def _check_megatron_layout(model_dir: str, cfg: Config) -> None:
    """The model must split the way the learner layout asks (kv heads over tensor ranks, layers over stages)."""
    from transformers import AutoConfig

    from learner.backends.megatron.model import model_shape

    try:
        model_shape(AutoConfig.from_pretrained(model_dir), cfg.learner.tensor_parallel, cfg.learner.pipeline_parallel)
    except ValueError as e:
        raise ConfigError(f"{model_dir}: {e}") from None


def _decay_steps(cfg: Config) -> int:
    """Cosine decay length: from the end of warmup to max_steps (config.validate made sure it is set: the
    number of steps is not known up front, since bad samples vary)."""
    o = cfg.learner.optim
    return max(1, cfg.algorithm.max_steps - o.warmup_steps) if o.schedule == "cosine" else 0

