"""Regenerates fixtures/llama/ (run by scripts/make_llama_fixtures.sh in the llama.cpp venv).

1. A tiny random Llama in both checkpoint layouts, for make test:
   - tiny.gguf: 2 layers, width 64, 4 heads over 2 key-value heads, feed-forward 96, an untied
     head, a byte-level BPE of 256 bytes + merges learned here from the fixture reviews, 3
     control tokens and 1 user-defined token, pre-tokenizer smollm. Its tensors take every
     type the reader dequantizes (Q8_0, Q4_0, Q4_1, F16, BF16, F32), quantized by the `gguf`
     package; the query and key rows permuted as llama.cpp's converter does.
   - tiny-hf/: the same weights as the GGUF holds them, dequantized by the `gguf` package,
     the query and key rows in the Hugging Face order, in model.safetensors (F16 and BF16
     tensors kept in their type, the others F32), with config.json and tokenizer.json.
   - tiny-llamacpp.jsonl: llama.cpp's tokens and next-token log-probabilities of
     tiny-texts.jsonl, computed on tiny.gguf dequantized to F32 by llama.cpp.
2. With the SmolLM2 GGUF (argument 2): llama.cpp's tokens of tokenizer-texts.jsonl (the
   hand-written hard texts, then the first 1,000 reviews of data/rt/raw.jsonl) and its
   next-token log-probabilities of the first 20 of them, on the model dequantized to F32.
"""
import json
import os
import subprocess
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import quants

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "llama")
REF = os.path.join(HERE, "llamacpp_reference.py")

WIDTH, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT, THETA, EPS = 64, 4, 2, 96, 2, 256, 10000.0, 1e-5
HD = WIDTH // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER = "<tiny_user>"


def byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def hard_texts():
    """Texts that exercise the pre-tokenizer: digits, punctuation, accents, emoji, spaces."""
    fixed = [
        "The quick brown fox jumps over the lazy dog.",
        "I bought the Apple iPhone and it was great.",
        "The Google Pixel is a phone; the Apple iPhone is another.",
        "It's 3:45 pm on 12/07/2026, and the ticket cost $1,299.99 (tax incl.).",
        "Call 555-0100 or +44 20 7946 0958 before 9am!",
        "In 1984, 2001 and 2049 the films grossed 123456789 dollars.",
        "Pi is 3.14159, e is 2.71828, and 1e-5 is small; 0x1F is 31.",
        "She said: \"Don't!\" -- then he replied, 'I won't... I can't.'",
        "What?! Really?? No way!!! ...ok.",
        "Café, naïve, résumé, façade, jalapeño, Zürich, Ångström, coöperate.",
        "Ελληνικά, русский язык, עברית, العربية, हिन्दी, 中文, 日本語, 한국어.",
        "I loved it 😀😀 but my friend hated it 😡 — go figure 🤷‍♀️.",
        "Flags 🇺🇸🇫🇷, hearts ❤️💔, hands 👍🏽👎🏿 and a family 👨‍👩‍👧‍👦.",
        "Tabs\tand\ttabs, newlines\nand\n\nblank lines,   runs of   spaces   .",
        "Trailing spaces   ",
        "   Leading spaces",
        "Mixed\r\nline endings\rhere.",
        "ALL CAPS SHOUTING, lowercase whispering, CamelCaseWords and snake_case_words.",
        "URLs like https://example.org/path?q=1&r=two#frag and emails a.b@c.de.",
        "Hashtags #BestMovieEver and @mentions, 100% sure, 50/50 chance, 3x faster.",
        "Fractions ½ ¾ and superscripts x² y³, roman Ⅻ, circled ① ②.",
        "Math: a+b=c, x<y>z, f(x)=x^2, [1,2,3], {k:v}, a|b, ~tilde, `code`.",
        "Quotes “curly” and ‘single’ and «guillemets» and „German“.",
        "He's, she'd, they'll, we've, I'm, you're, it's, 'S and 'T uppercase: HE'S.",
        "Numbers glued: abc123def, 4ever, 2day, 10k, 3.5mm, v1.2.3-rc4.",
        "A very looooooooooooooooooong word and aaaaaaaaaaaaaaaaaaaaaaaaaaaa.",
        "Zero-width joiner\u200dhere, soft\u00adhyphen, non\u00a0breaking space.",
        "<|im_start|>user\nHello<|im_end|> is written as text, not parsed.",
        "Ellipsis… em dash — en dash – bullet • degree ° section § pilcrow ¶.",
        "Japanese: 映画はとても面白かったです。Korean: 영화가 정말 재미있었어요!",
    ]
    words = ["movie", "phone", "battery", "screen", "plot", "actor", "camera", "price"]
    accents = ["é", "ü", "ñ", "ø", "ç", "à", "ß", "ł"]
    emoji = ["😀", "🎬", "📱", "🔋", "⭐", "🍿", "💯", "🙄"]
    generated = []
    for i in range(90):
        w = words[i % len(words)]
        a = accents[(i * 3) % len(accents)]
        e = emoji[(i * 5) % len(emoji)]
        n = (i * 7919) % 100000
        sep = [" ", "  ", "\t", "\n", " \n ", ", ", "; ", "!? "][i % 8]
        generated.append(f"The {w}{a} cost {n}.{i % 100:02d}{sep}{e} rating {i % 11}/10{'!' * (i % 3)} ({w.upper()}'s #{i})")
    return fixed + generated


def learn_merges(texts, count, pre_words):
    """Greedy BPE merges over byte-encoded words (counts of adjacent pairs, most frequent first)."""
    bc = byte_chars()
    words = {}
    for t in texts:
        for w in pre_words(t):
            key = tuple(bc[b] for b in w.encode("utf-8"))
            words[key] = words.get(key, 0) + 1
    merges = []
    for _ in range(count):
        pairs = {}
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def simple_words(text):
    """Words for learning merges only: split before spaces (the merges need not be optimal)."""
    out, cur = [], ""
    for c in text:
        if c == " " and cur:
            out.append(cur)
            cur = ""
        cur += c
    if cur:
        out.append(cur)
    return out


def permute(w, heads):
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (arr, dtype) in tensors.items():
        data = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def run_reference(args, out_path):
    with open(out_path, "w", encoding="utf-8") as f:
        subprocess.run([sys.executable, REF, *args], check=True, stdout=f)


def tiny(reviews):
    rng = np.random.default_rng(2026)
    bc = byte_chars()
    merges = learn_merges(reviews[:400], 160, simple_words)
    tokens = SPECIALS + bc + [a + b for a, b in merges] + [USER]
    # A merge's result may repeat an existing token; keep tokens unique as tokenizers do.
    seen, uniq = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            uniq.append(t)
    tokens = uniq
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    vocab = len(tokens)

    def mat(rows, cols, scale):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    hf = {"model.embed_tokens.weight": mat(vocab, WIDTH, 0.5)}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        hf[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
        hf[p + "self_attn.q_proj.weight"] = mat(HEADS * HD, WIDTH, 0.2)
        hf[p + "self_attn.k_proj.weight"] = mat(KV_HEADS * HD, WIDTH, 0.2)
        hf[p + "self_attn.v_proj.weight"] = mat(KV_HEADS * HD, WIDTH, 0.2)
        hf[p + "self_attn.o_proj.weight"] = mat(WIDTH, HEADS * HD, 0.1)
        hf[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
        hf[p + "mlp.gate_proj.weight"] = mat(FFN, WIDTH, 0.15)
        hf[p + "mlp.up_proj.weight"] = mat(FFN, WIDTH, 0.15)
        hf[p + "mlp.down_proj.weight"] = mat(WIDTH, FFN, 0.1)
    hf["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
    hf["lm_head.weight"] = mat(vocab, WIDTH, 0.3)

    # GGUF name, HF name, type: every type the reader dequantizes, on both layers.
    types_of = {
        "token_embd.weight": ("model.embed_tokens.weight", Q.Q8_0),
        "output_norm.weight": ("model.norm.weight", Q.F32),
        "output.weight": ("lm_head.weight", Q.Q4_1),
    }
    layer_types = [
        {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.BF16, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F32},
        {"attn_q": Q.BF16, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0, "ffn_gate": Q.F16, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0},
    ]
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for l in range(LAYERS):
        types_of[f"blk.{l}.attn_norm.weight"] = (f"model.layers.{l}.input_layernorm.weight", Q.F32)
        types_of[f"blk.{l}.ffn_norm.weight"] = (f"model.layers.{l}.post_attention_layernorm.weight", Q.F32)
        for g, t in layer_types[l].items():
            types_of[f"blk.{l}.{g}.weight"] = (f"model.layers.{l}.{hf_names[g]}.weight", t)

    w = gguf.GGUFWriter(os.path.join(OUT, "tiny.gguf"), "llama")
    w.add_name("tiny random llama (fixture)")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    safet = {}
    for gname, (hname, t) in types_of.items():
        x = hf[hname]
        if ".attn_q." in gname:
            x = permute(x, HEADS)
        elif ".attn_k." in gname:
            x = permute(x, KV_HEADS)
        if t == Q.F32:
            data, back = x, x
        elif t == Q.F16:
            data = x.astype(np.float16)
            back = data.astype(np.float32)
        else:
            data = quants.quantize(x, t)
            back = quants.dequantize(data, t).reshape(x.shape).astype(np.float32)
        w.add_tensor(gname, data, raw_dtype=t if t not in (Q.F32, Q.F16) else None)
        # The Hugging Face copy: the values the GGUF holds, rows in the HF order.
        if ".attn_q." in gname:
            back = permute_back(back, HEADS)
        elif ".attn_k." in gname:
            back = permute_back(back, KV_HEADS)
        if t == Q.F16:
            safet[hname] = (back.astype(np.float16), "F16")
        elif t == Q.BF16:
            safet[hname] = ((back.view(np.uint32) >> 16).astype(np.uint16), "BF16")
        else:
            safet[hname] = (np.ascontiguousarray(back, dtype=np.float32), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    hfdir = os.path.join(OUT, "tiny-hf")
    os.makedirs(hfdir, exist_ok=True)
    write_safetensors(os.path.join(hfdir, "model.safetensors"), dict(sorted(safet.items())))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": WIDTH, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CONTEXT, "rms_norm_eps": EPS, "rope_theta": THETA, "rope_scaling": None,
        "tie_word_embeddings": False, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "float32",
    }
    with open(os.path.join(hfdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i, t in enumerate(SPECIALS)]
    added.append({"id": vocab - 1, "content": USER, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens[:-1]) if i >= len(SPECIALS)} | {t: i for i, t in enumerate(SPECIALS)},
                  "merges": [[a, b] for a, b in merges]},
    }
    with open(os.path.join(hfdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)

    texts = hard_texts()[:14] + [f"The plot holds {USER} twice{USER}.", "x" * 40 + " 1234567890"]
    texts += reviews[1000:1008]
    with open(os.path.join(OUT, "tiny-texts.jsonl"), "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"kind": "example", "v": 1, "id": f"tiny-{i:02d}", "text": t, "label": 0}, ensure_ascii=False) + "\n")
    f32 = os.path.join(OUT, "tiny-f32.gguf.tmp")
    subprocess.run([sys.executable, REF, "f32", os.path.join(OUT, "tiny.gguf"), f32], check=True)
    run_reference(["logprobs", f32, os.path.join(OUT, "tiny-texts.jsonl")], os.path.join(OUT, "tiny-llamacpp.jsonl"))
    os.remove(f32)


def permute_back(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def smollm2(model, reviews):
    texts = hard_texts() + reviews[:1000]
    path = os.path.join(OUT, "tokenizer-texts.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"kind": "example", "v": 1, "id": f"t{i:04d}", "text": t, "label": 0}, ensure_ascii=False) + "\n")
    run_reference(["tokens", model, path], os.path.join(OUT, "smollm2-llamacpp-tokens.jsonl"))
    first = os.path.join(OUT, "logprob-texts.jsonl")
    with open(path, encoding="utf-8") as f, open(first, "w", encoding="utf-8") as g:
        for line in list(f)[:20]:
            g.write(line)
    f32 = model + ".f32.gguf"
    if not os.path.exists(f32):
        subprocess.run([sys.executable, REF, "f32", model, f32], check=True)
    run_reference(["logprobs", f32, first], os.path.join(OUT, "smollm2-llamacpp-logprobs.jsonl"))


def main():
    raw = sys.argv[1]
    with open(raw, encoding="utf-8") as f:
        reviews = [json.loads(line)["text"] for line in f]
    os.makedirs(OUT, exist_ok=True)
    tiny(reviews)
    if len(sys.argv) > 2 and os.environ.get("TINY_ONLY") != "1":
        smollm2(sys.argv[2], reviews)


if __name__ == "__main__":
    main()
