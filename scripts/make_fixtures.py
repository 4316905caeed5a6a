"""Regenerates the committed test fixtures from the real data (run `make data` first).

  fixtures/rt-mini/raw.jsonl     every 20th Rotten Tomatoes snippet, plus those mentioning
                                 "bond" or "james" (so natural occurrences exist)
  fixtures/glove-mini/words.txt  the 2,000 most frequent GloVe words plus the fixture's words,
  fixtures/glove-mini/vectors.npy  in GloVe order, float32, column-major like the package's .npy

Pure Python (no numpy) so it runs in the lean venv: python scripts/make_fixtures.py
"""
import json
import mmap
import os
import re
import struct

TOP = 2000
EVERY = 20


def write_atomic(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def main():
    lines = open("data/rt/raw.jsonl", encoding="utf-8").read().splitlines()
    keep = [l for i, l in enumerate(lines) if i % EVERY == 0 or re.search(r"\b(bond|james)\b", json.loads(l)["text"], re.I)]
    write_atomic("fixtures/rt-mini/raw.jsonl", ("\n".join(keep) + "\n").encode())

    # Generous token guess: the Rust tokenizer's words are a subset of these pieces.
    pieces = set()
    for l in keep:
        text = json.loads(l)["text"].lower().replace("\u2019", "'")
        pieces.update(re.findall(r"[a-z0-9]+(?:[-'.&][a-z0-9]+)*\.?|n't|'[a-z]+|[^\sa-z0-9]+|[^\sa-z0-9]", text))
        pieces.update(p for w in re.findall(r"\S+", text) for p in re.split(r"[^a-z0-9]+", w) if p)
        pieces.update(w[:-3] for w in re.findall(r"[a-z]+n't", text))
    pieces.update(["james", "bond", "-", "'s"])

    words = open("data/glove/words.txt", encoding="utf-8").read().split("\n")[:-1]
    rows = [i for i, w in enumerate(words) if i < TOP or w in pieces]

    with open("data/glove/vectors.npy", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        hlen = struct.unpack("<H", mm[8:10])[0]
        header = mm[10 : 10 + hlen].decode()
        assert "'fortran_order': True" in header and "'<f4'" in header, header
        n, dim = map(int, re.search(r"\((\d+), (\d+)\)", header).groups())
        off = 10 + hlen
        cols = []
        for j in range(dim):
            base = off + j * n * 4
            cols.append(b"".join(mm[base + i * 4 : base + i * 4 + 4] for i in rows))
        mm.close()
    new_header = "{'descr': '<f4', 'fortran_order': True, 'shape': (%d, %d), }" % (len(rows), dim)
    pad = 64 - (10 + len(new_header) + 1) % 64
    new_header += " " * pad + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(new_header)) + new_header.encode() + b"".join(cols)
    write_atomic("fixtures/glove-mini/vectors.npy", npy)
    write_atomic("fixtures/glove-mini/words.txt", ("\n".join(words[i] for i in rows) + "\n").encode())
    print(f"fixtures: {len(keep)} snippets, {len(rows)} GloVe rows of {dim} dims")


if __name__ == "__main__":
    main()
