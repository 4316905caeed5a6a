"""llama.cpp's reading of texts, the reference the project's Llama victim is compared with.

Runs in the venv of scripts/setup_llamacpp.sh (llama-cpp-python, which compiles llama.cpp).
Subcommands (texts are example JSONL records, read for their `id` and `text`):

  f32 SRC DST                 DST: SRC with every tensor dequantized to F32 (llama.cpp's own
                              quantize function, ftype ALL_F32), so both sides compute the
                              same weights without llama.cpp quantizing activations.
  tokens MODEL TEXTS          one {"id","ids"} line per text: llama.cpp's tokenizer
  logprobs MODEL TEXTS        one {"id","ids","logprobs"} line per text: next-token
                              log-probabilities (natural log; logprobs[t] is of ids[t+1])

Conventions, the project's: no beginning-of-text token (add_bos False: SmolLM2's own setting),
control tokens in the text are text (special False), no chat template. The KV cache is F32
(llama.cpp's default is F16, which moves log-probabilities by up to about 6e-3 on SmolLM2),
flash attention off, one sequence at a time, 2 threads.
"""
import ctypes
import json
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

GGML_TYPE_F32 = 0


def texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def f32(src, dst):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    p.nthread = 2
    p.allow_requantize = True
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"llamacpp_reference: llama.cpp could not write {dst} from {src} (code {rc})")
    os.replace(tmp, dst)


def load(model, n_ctx=2048, vocab_only=False):
    return llama_cpp.Llama(
        model_path=model, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2, n_threads_batch=2,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False, vocab_only=vocab_only,
    )


def tokenize(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def log_softmax(rows):
    rows = np.asarray(rows, dtype=np.float64)
    m = rows.max(-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(-1, keepdims=True))


def main():
    cmd = sys.argv[1]
    if cmd == "f32":
        f32(sys.argv[2], sys.argv[3])
        return
    model, path = sys.argv[2], sys.argv[3]
    llm = load(model, vocab_only=(cmd == "tokens"))
    out = sys.stdout
    for r in texts(path):
        ids = tokenize(llm, r["text"])
        rec = {"id": r["id"], "ids": ids}
        if cmd == "logprobs":
            llm.reset()
            llm.eval(ids)
            ls = log_softmax(llm.scores[: len(ids)])
            rec["logprobs"] = [float(ls[t, ids[t + 1]]) for t in range(len(ids) - 1)]
            assert all(math.isfinite(x) for x in rec["logprobs"])
        elif cmd != "tokens":
            sys.exit(f"llamacpp_reference: unknown subcommand {cmd!r}")
        out.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
