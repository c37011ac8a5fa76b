"""Run a written GGUF file in real llama.cpp: its tokenization and its greedy continuations.

Why: transformers reads GGUF by dequantising it into a PyTorch model, so a file it reads back can
still be one llama.cpp (and so Ollama, LM Studio, llama-server) refuses or runs differently: an
unknown `tokenizer.ggml.pre` name, a wrong k-quant bit layout, a missing key. The only complete
check is llama.cpp itself. Its Python bindings are a C++ source build, but node-llama-cpp on npm
ships llama.cpp prebuilt for CPU (the `@node-llama-cpp/linux-x64` package, ~85 MB), so tunelab
drives that from a tiny Node script: `make llamacpp` (or `install_command()`) installs it into
`$TUNELAB_LLAMACPP` (default `~/.cache/tunelab/llamacpp`). Without Node or the package every
function here says so (`available()` is False) and the export checks stay transformers-only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

NODE_LLAMA_CPP = "3.22.1"

_SCRIPT = r"""
import {getLlama} from "node-llama-cpp";
const job = JSON.parse(await new Promise((ok) => { let s = ""; process.stdin.on("data", (d) => s += d);
                                                   process.stdin.on("end", () => ok(s)); }));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: job.threads});
const model = await llama.loadModel({modelPath: job.model});
const ctx = await model.createContext({contextSize: job.context, sequences: 1, threads: job.threads});
const seq = ctx.getSequence();
const out = {tokenized: job.texts.map((t) => Array.from(model.tokenize(t, true))), greedy: [],
             bos: model.tokens.bos, eos: model.tokens.eos};
for (const ids of job.prompts) {
  await seq.clearHistory();
  const got = [];
  if (job.new_tokens > 0) {
    for await (const t of seq.evaluate(ids, {temperature: 0, yieldEogToken: true})) { got.push(t); if (got.length >= job.new_tokens) break; }
  }
  out.greedy.push(got);
}
console.log(JSON.stringify(out));
await ctx.dispose(); await model.dispose(); await llama.dispose();
"""


def home() -> Path:
    """Where node-llama-cpp is (or goes): `$TUNELAB_LLAMACPP`, else ~/.cache/tunelab/llamacpp."""
    return Path(os.environ.get("TUNELAB_LLAMACPP") or Path.home() / ".cache" / "tunelab" / "llamacpp")


def install_command() -> list[str]:
    """The npm command that installs llama.cpp's CPU build (no CUDA/Vulkan variants, no postinstall build)."""
    return ["npm", "install", "--prefix", str(home()), "--no-audit", "--no-fund", "--omit=optional",
            "--ignore-scripts", f"node-llama-cpp@{NODE_LLAMA_CPP}", f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"]


def available() -> str | None:
    """None when llama.cpp can run here, else why not (one line)."""
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not (home() / "node_modules" / "node-llama-cpp").is_dir():
        return f"node-llama-cpp is not installed in {home()} (run: make llamacpp)"
    return None


def run(gguf_file: str | Path, prompts: list[list[int]], texts: list[str], new_tokens: int = 8,
        context: int = 512, threads: int = 2, timeout: float = 600) -> dict:
    """llama.cpp's tokenization of each of `texts` (special tokens parsed, as a rendered chat is; no BOS added) and its greedy
    `new_tokens` continuation of each id list in `prompts`. RuntimeError (with llama.cpp's own message) when
    llama.cpp cannot load or run the file."""
    why = available()
    if why:
        raise RuntimeError(f"llama.cpp is not available: {why}")
    script = home() / "tunelab_run.mjs"
    tmp = script.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(_SCRIPT, encoding="utf-8")
    tmp.replace(script)
    job = {"model": str(Path(gguf_file).resolve()), "prompts": prompts, "texts": texts,
           "new_tokens": new_tokens, "context": context, "threads": threads}
    proc = subprocess.run(["node", str(script)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout, cwd=home())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
        raise RuntimeError(f"llama.cpp could not run {Path(gguf_file).name}: "
                           f"{(errors or proc.stderr.splitlines() or ['no output'])[0].strip()}")
    return json.loads(lines[-1])


def install() -> None:
    """Install llama.cpp's CPU build where `home()` says (`make llamacpp`); RuntimeError without npm."""
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed (llama.cpp's CPU build comes from npm: node-llama-cpp)")
    home().mkdir(parents=True, exist_ok=True)
    subprocess.run(install_command(), check=True)


if __name__ == "__main__":
    install()
