"""The remote judge's wire format and retry rules, without a server (tests/test_triton_judge.py has the real
one): requests and results survive the trip exactly, and nothing malformed in a reply gets through."""

import json
import socket

import numpy as np
import pytest

from actors.engines.protocol import GenerationRequest, GenerationResult, SamplingParams
from actors.judges import triton_wire as wire
from actors.judges.triton import RemoteJudgeFailed, TritonEngine, TritonSpec, probe
from actors.serve_judge import parse_args
from orchestration.config import ConfigError, load_config

SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=6, stop_strings=("\n\n", "END"))
REQUESTS = [GenerationRequest([5, 6, 7], SAMPLING, seed=2**62 + 3), GenerationRequest([9], SAMPLING, seed=1)]
RESULTS = [GenerationResult([1, 2, 3], "stop", 0, None, "END"), GenerationResult([4] * 6, "length", 0)]


def test_requests_arrive_exactly_as_sent():
    got = wire.decode_requests(wire.encode_requests(REQUESTS))
    assert got == [GenerationRequest(list(r.prompt_ids), r.sampling, r.seed) for r in REQUESTS]
    assert got[0].sampling.temperature == 0.7  # exact: not rounded through float32


def test_results_arrive_exactly_as_sent():
    assert wire.decode_results(wire.encode_results(RESULTS), REQUESTS, vocab_size=10) == RESULTS


@pytest.mark.parametrize("corrupt, message", [
    (lambda o: o.pop("finish_reason"), "'finish_reason' should have 2 rows"),
    (lambda o: o.update(token_ids=o["token_ids"][:1]), "'token_ids' should have 2 rows"),
    (lambda o: o["token_ids"].__setitem__((0, 1), 10), "outside the vocabulary"),
    (lambda o: o["token_ids"].__setitem__((0, 1), -1), "outside the vocabulary"),
    (lambda o: o["num_tokens"].__setitem__((1, 0), 7), "7 tokens, outside 0..6"),
    (lambda o: o["finish_reason"].__setitem__((0, 0), b"eos"), "finish_reason 'eos'"),
    (lambda o: o["stop_text"].__setitem__((0, 0), b"Score:"), "stop_text 'Score:'"),
    (lambda o: o.update(num_tokens=o["num_tokens"].astype(np.float64)), "should be integers"),
])
def test_a_malformed_or_out_of_range_reply_is_refused(corrupt, message):
    outputs = wire.encode_results(RESULTS)
    corrupt(outputs)
    with pytest.raises(wire.MalformedReply, match=message):
        wire.decode_results(outputs, REQUESTS, vocab_size=10)


def test_the_server_refuses_requests_it_cannot_serve_naming_the_row():
    inputs = wire.encode_requests(REQUESTS)
    inputs["sampling"][1, 0] = json.dumps({"temperature": 1.0, "beam_width": 4}).encode()
    with pytest.raises(ValueError, match=r"row 1: .*unknown sampling field\(s\) \['beam_width'\]"):
        wire.decode_requests(inputs)
    inputs = wire.encode_requests(REQUESTS)
    inputs["prompt_len"][0, 0] = 9
    with pytest.raises(ValueError, match="row 0: prompt_len=9 is outside 1..3"):
        wire.decode_requests(inputs)


def test_an_info_reply_must_be_serve_judges():
    good = wire.info_json(max_seq_len=256, vocab_size=10, max_batch_size=4, model="m",
                          tokenizer_files={"tokenizer_config.json": "{}"})
    assert wire.parse_info(good)["max_seq_len"] == 256
    for bad, message in (("<html>", "not JSON"), (json.dumps({"wire_version": 0}), "not wire version"),
                         (good.replace('"vocab_size": 10', '"vocab_size": -1'), "vocab_size is -1"),
                         (good.replace("tokenizer_config.json", "model.py"), "not a set of tokenizer files")):
        with pytest.raises(wire.MalformedReply, match=message):
            wire.parse_info(bad)


class ScriptedEngine(TritonEngine):
    """A TritonEngine whose transport plays a script: each entry is a reply (dict) or an exception."""

    def __init__(self, spec, script):
        self.script, self.sleeps = list(script), []
        info = wire.info_json(max_seq_len=64, vocab_size=10, max_batch_size=1, model="m",
                              tokenizer_files={"tokenizer_config.json": "{}"})
        self.script.insert(0, {"info": np.array([info.encode()], dtype=np.object_)})
        super().__init__(spec, sleep=self.sleeps.append)

    def _infer(self, model, arrays, outputs):
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


SPEC = TritonSpec(url="127.0.0.1:9", retries=2, retry_backoff_s=0.5, concurrency=1)


def test_failed_tries_are_counted_by_kind_and_retried_with_backoff():
    bad = wire.encode_results(RESULTS[:1])
    bad["finish_reason"][0, 0] = b"??"
    engine = ScriptedEngine(SPEC, [TimeoutError("timed out"), bad, wire.encode_results(RESULTS[:1])])
    assert engine.generate(REQUESTS[:1]) == RESULTS[:1]
    stats = engine.take_stats()
    assert (stats["timeouts"], stats["malformed"], stats["retries"], stats["failed"]) == (1, 1, 2, 0)
    assert stats["requests"] == 2  # the info request and the one that was answered
    assert engine.sleeps == [0.5, 1.0]
    assert engine.take_stats()["retries"] == 0  # taken: counting starts again


def test_a_judge_that_keeps_failing_stops_with_the_url():
    engine = ScriptedEngine(SPEC, [ConnectionRefusedError("[Errno 111] Connection refused")] * 3)
    with pytest.raises(RemoteJudgeFailed, match=r"remote judge at http://127.0.0.1:9 \(model 'judge'\) failed 3 "
                                                 r"times .*ConnectionRefusedError"):
        engine.generate(REQUESTS[:1])
    stats = engine.take_stats()
    assert (stats["unavailable"], stats["retries"], stats["failed"]) == (3, 2, 1)


def test_rows_are_split_into_requests_of_the_servers_batch_size_in_order():
    engine = ScriptedEngine(SPEC, [wire.encode_results(RESULTS[:1]), wire.encode_results(RESULTS[1:])])
    assert engine.generate(REQUESTS) == RESULTS


@pytest.mark.parametrize("override, message", [
    ("judge.triton.url=localhost", "judge.triton.url='localhost' is not host:port"),
    ("judge.triton.protocol=https", "judge.triton.protocol='https' is not one of: http, grpc"),
    ("judge.triton.retries=-1", "judge.triton.retries must be >= 0"),
    ("judge.triton.timeout_s=0", "judge.triton.timeout_s must be > 0"),
    ("judge.triton.chat_template=chatml", "judge.triton.chat_template='chatml' is not a chat template preset"),
])
def test_triton_settings_are_checked_at_start_up(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["judge.backend=triton", override])


def test_a_fixed_judge_model_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="judge.backend=model needs judge.model.path"):
        load_config(["judge.backend=model"])
    with pytest.raises(ConfigError, match=r"judge.model.path='.*' is not a Hugging Face checkpoint"):
        load_config(["judge.backend=model", f"judge.model.path={tmp_path}"])


def test_the_server_command_checks_its_arguments(tiny_llama):
    cfg = parse_args([f"model.path={tiny_llama}", "port=9000"])
    assert (cfg.host, cfg.port, cfg.grpc_port, cfg.model_name) == ("127.0.0.1", 9000, 8001, "judge")  # loopback
    for argv, message in (([], "model.path=None is not a Hugging Face checkpoint"),
                          ([f"model.path={tiny_llama}", "hots=0.0.0.0"], "Key 'hots' not in 'ServeConfig'"),
                          ([f"model.path={tiny_llama}", "port=abc"], "port: Value 'abc'"),
                          ([f"model.path={tiny_llama}", "grpc_port=8000"], "must differ"),
                          ([f"model.path={tiny_llama}", "model_name=judge_info"], "must not end with '_info'"),
                          ([f"model.path={tiny_llama}", "8000"], "'8000' is not key=value")):
        with pytest.raises(ValueError, match=message):
            parse_args(argv)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_no_server_at_the_url_fails_before_the_run_starts_naming_it(protocol):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteJudgeFailed, match=rf"{protocol}://127.0.0.1:{port} \(model 'judge'\) failed 2 times "
                                                 "asking for the served model's info"):
        probe(TritonSpec(url=f"127.0.0.1:{port}", protocol=protocol, retries=1, retry_backoff_s=0.01, timeout_s=5))
