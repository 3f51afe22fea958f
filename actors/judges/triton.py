"""`judge.backend=triton`: an LLM judge whose engine is remote, a Triton server (actors/serve_judge.py) reached
with tritonclient over HTTP or gRPC.

The judge itself (template, chat template, parsing) runs here, in LLMJudge, exactly as a local judge; only
generation crosses the network, as engine requests (actors/judges/triton_wire.py). So a remote judge scores
like the same model judging locally with the same seeds. The tokenizer comes from the server (its `_info`
model), so templates render with the tokenizer the server generates with.

Nothing the server sends is trusted. A request whose reply is malformed or out of range, that times out, or
that finds no server is counted and tried again (`judge.triton.retries` more times, with a backoff); then
the call fails with RemoteJudgeFailed naming the URL, and the run stops with a checkpoint (it resumes: the
prompts in flight are generated again with the same seeds). The judge is fixed: it is never refit and its
judgements record FIXED as their weight version.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from actors.engines.protocol import GenerationRequest, GenerationResult
from actors.fixed_host import FixedHost

from . import triton_wire as wire
from .llm import LLMJudge
from .protocol import JudgeBatch, JudgeItem, JudgeSpec, MetaBatch, MetaItem

PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class TritonSpec:
    """Where the remote judge is and how hard to try (judge.triton.*)."""

    url: str  # host:port of the server's HTTP or gRPC endpoint
    protocol: str = "http"
    model_name: str = "judge"
    timeout_s: float = 120.0  # one request (one batch of rows) may take this long
    retries: int = 3  # tries after the first, per request
    retry_backoff_s: float = 1.0  # the wait before retry r is retry_backoff_s * 2**(r-1)
    concurrency: int = 4  # requests in flight at once (per judge replica)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"judge.triton.protocol={self.protocol!r} is not one of: {', '.join(PROTOCOLS)}")
        if "://" in self.url:
            raise ValueError(f"judge.triton.url={self.url!r}: give host:port, without a scheme")
        host, _, port = self.url.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"judge.triton.url={self.url!r} is not host:port")
        for key in ("timeout_s", "retry_backoff_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"judge.triton.{key} must be > 0, got {getattr(self, key)}")
        if self.retries < 0 or self.concurrency < 1:
            raise ValueError(f"judge.triton.retries must be >= 0 and judge.triton.concurrency >= 1, got "
                             f"{self.retries} and {self.concurrency}")

    @property
    def where(self) -> str:
        return f"{self.protocol}://{self.url} (model {self.model_name!r})"


class RemoteJudgeFailed(RuntimeError):
    """The remote judge could not answer a request within judge.triton.retries; names the URL."""


# The counters a TritonEngine keeps (JudgeBatch.backend_stats): sums, except latency_max_s.
STAT_KEYS = ("requests", "retries", "timeouts", "unavailable", "malformed", "failed", "latency_s", "latency_max_s")


def _kind(error: BaseException) -> str:
    if isinstance(error, wire.MalformedReply):
        return "malformed"
    text = f"{type(error).__name__} {error}".lower()
    return "timeouts" if any(w in text for w in ("timeout", "timed out", "deadline")) else "unavailable"


class TritonEngine:
    """`generate` of the engine protocol over a Triton server: rows split into requests of the server's
    max_batch_size, up to `concurrency` in flight, each tried 1 + retries times."""

    def __init__(self, spec: TritonSpec, sleep=time.sleep):
        self.spec, self._sleep = spec, sleep
        self._local = threading.local()  # one client per thread: tritonclient's clients are not thread-safe
        self._lock = threading.Lock()
        self.stats = dict.fromkeys(STAT_KEYS, 0.0)
        self._pool = ThreadPoolExecutor(spec.concurrency, thread_name_prefix="triton-judge")
        self.info = wire.parse_info(self._with_retries("asking for the served model's info", self._fetch_info))
        self.max_seq_len, self.vocab_size = self.info["max_seq_len"], self.info["vocab_size"]
        self.rows_per_request = self.info["max_batch_size"]

    # ---- transport --------------------------------------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            s = self.spec
            if s.protocol == "http":
                import tritonclient.http as module

                client = module.InferenceServerClient(s.url, connection_timeout=s.timeout_s,
                                                      network_timeout=s.timeout_s)
            else:
                import tritonclient.grpc as module

                client = module.InferenceServerClient(s.url)
            self._local.client, self._local.module = client, module
        return client

    def _infer(self, model: str, arrays: dict, outputs: Sequence[str]) -> dict:
        client = self._client()
        module = self._local.module
        inputs = []
        for name, value in arrays.items():
            tensor = module.InferInput(name, list(value.shape), "BYTES" if value.dtype.kind == "O" else "INT64")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        wanted = [module.InferRequestedOutput(name) for name in outputs]
        extra = {"client_timeout": self.spec.timeout_s} if self.spec.protocol == "grpc" else {}
        reply = client.infer(model, inputs, outputs=wanted, **extra)
        return {name: reply.as_numpy(name) for name in outputs}

    def _reset_client(self) -> None:
        """After a failure: a new connection for the next try (a timed-out one may still carry the old reply)."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is dropped either way
                pass

    def _fetch_info(self) -> str:
        import numpy as np

        reply = self._infer(self.spec.model_name + wire.INFO_SUFFIX,
                            {"request": np.array([b"info"], dtype=np.object_)}, ["info"])["info"]
        if reply is None or reply.size != 1:
            raise wire.MalformedReply("the info reply has no single 'info' value")
        value = reply.reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    def _with_retries(self, what: str, attempt):
        last: BaseException | None = None
        for n in range(self.spec.retries + 1):
            if n:
                self._count("retries")
                self._sleep(self.spec.retry_backoff_s * 2 ** (n - 1))
            started = time.monotonic()
            try:
                value = attempt()
            except Exception as e:  # noqa: BLE001 - every transport or reply failure is counted and retried
                last = e
                self._count(_kind(e))
                self._reset_client()
                continue
            self._count("requests")
            self._count("latency_s", time.monotonic() - started)
            return value
        self._count("failed")
        raise RemoteJudgeFailed(
            f"the remote judge at {self.spec.where} failed {self.spec.retries + 1} times {what} "
            f"(judge.triton.retries={self.spec.retries}, timeout {self.spec.timeout_s:g}s); last error: "
            f"{type(last).__name__}: {str(last).strip().splitlines()[0] if str(last).strip() else ''}")

    def _count(self, key: str, value: float = 1.0) -> None:
        with self._lock:
            if key == "latency_s":
                self.stats["latency_max_s"] = max(self.stats["latency_max_s"], value)
            self.stats[key] += value

    def take_stats(self) -> dict[str, float]:
        with self._lock:
            out, self.stats = self.stats, dict.fromkeys(STAT_KEYS, 0.0)
        return out

    # ---- the engine protocol --------------------------------------------------------------------------

    def _request(self, rows: list[GenerationRequest]) -> list[GenerationResult]:
        arrays = wire.encode_requests(rows)
        outputs = [name for name, _, _, _ in wire.OUTPUTS]

        def attempt():
            return wire.decode_results(self._infer(self.spec.model_name, arrays, outputs), rows, self.vocab_size)

        return self._with_retries(f"on a request of {len(rows)} rows", attempt)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        requests = list(requests)
        step = self.rows_per_request
        parts = [requests[i : i + step] for i in range(0, len(requests), step)]
        return [r for part in self._pool.map(self._request, parts) for r in part]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def probe(spec: TritonSpec) -> dict:
    """The server's info reply, asked once with the usual retries: lets a run fail before its pools start
    when the remote judge is not there (RemoteJudgeFailed naming the URL)."""
    engine = TritonEngine(spec)
    engine.close()
    return engine.info


def served_tokenizer(info: dict):
    """The served model's tokenizer, from the files its server sent (text only: nothing is executed)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="selfreward-judge-tokenizer-") as tmp:
        for name, text in info["tokenizer"].items():
            (Path(tmp) / name).write_text(text)
        return AutoTokenizer.from_pretrained(tmp)


class TritonJudgeActor(FixedHost):
    """A judge replica whose engine is a Triton server; never refit (FixedHost)."""

    backend = "triton"

    def __init__(self, judge: JudgeSpec, remote: TritonSpec):
        super().__init__()
        self.engine = TritonEngine(remote)
        self.llm = LLMJudge(judge, served_tokenizer(self.engine.info), self.engine.max_seq_len, self._generate)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.engine.generate(requests) if requests else []

    @property
    def can_meta_judge(self) -> bool:
        return self.llm.can_meta_judge

    def vocab_digest(self) -> str:
        return self.llm.vocab_digest()

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        batch = self.llm.judge(items)
        batch.backend_stats = {f"remote_{k}": v for k, v in self.engine.take_stats().items()}
        return batch

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        batch = self.llm.meta_judge(items)
        batch.backend_stats = {f"remote_{k}": v for k, v in self.engine.take_stats().items()}
        return batch

    def memory_plan(self) -> str:
        return (f"remote judge at {self.engine.spec.where}: {self.engine.max_seq_len} context, "
                f"{self.engine.rows_per_request} rows per request, {self.engine.spec.concurrency} in flight")
