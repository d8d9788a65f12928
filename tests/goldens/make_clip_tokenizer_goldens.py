"""Goldens for astraea_jax/models/clip_tokenizer.py: CLIP's tokenizer built from vocab.json + merges.txt.

HunyuanVideo (arXiv 2412.03603) releases in diffusers' layout ship CLIP-L's tokenizer in
`tokenizer_2/` as the slow tokenizer's files, possibly without `tokenizer.json`. This writes a TINY
folder of that layout and what transformers' CLIP tokenizer makes of a few prompts.

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_clip_tokenizer_goldens.py

Writes under tests/goldens/clip_tokenizer/:
  vocab.json, merges.txt       a tiny CLIP vocabulary: the 256 byte-level symbols, their `</w>`
                               forms, the results of a few dozen merges (so a handful of words
                               become one token), then `<|startoftext|>`, `<|endoftext|>` — the
                               order of CLIP's own vocabulary
  tokenizer_config.json        from `CLIPTokenizer.save_pretrained` (its tokenizer.json deleted),
                               with the entries of CLIP-L's own config added (added_tokens_decoder:
                               <|startoftext|> normalized, <|endoftext|> not; model_max_length 77)
  special_tokens_map.json      written here as CLIP-L's is (5.x's save_pretrained writes none)
  io.json                      per prompt, transformers' input_ids and attention_mask with
                               padding="max_length", max_length=16, truncation=True, from
                               `CLIPTokenizerFast.from_pretrained` on this folder; and
                               `plain_config_input_ids`, the same from a copy whose config has no
                               added_tokens_decoder (special tokens all un-normalized), which
                               differ only for the prompt that spells `<|StartOfText|>` in capitals

In transformers 5.x `CLIPTokenizerFast` is an alias of `CLIPTokenizer` (a tokenizers-backed class;
the pure-Python slow tokenizer is gone), so the two references compared here are (a) the class
constructed directly from the vocab dict and merges list and (b) `CLIPTokenizerFast.from_pretrained`
on the saved folder, which reads vocab.json + merges.txt + tokenizer_config.json from disk.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast

OUT = pathlib.Path(__file__).resolve().parent / "clip_tokenizer"
MAX_LENGTH = 16

WORDS = ["a", "photo", "of", "cat", "the", "dog", "'s", "running", "and", "on", "mat", "caf\u00e9",
         "hello", "world", "12", "!!", "fast", "in", "park"]

PROMPTS = [
    "A photo of a CAT.",
    "The dog's running,  fast!!",
    "   leading\tand \n trailing   ",
    "Numbers 12345 and 3.14",
    "Cafe\u0301 na\u00efve R\u00c9SUM\u00c9",  # decomposed e + acute (NFC), accents, upper-case accent
    "a cat \U0001F431 on a mat",
    "",
    "the dog and the cat are running in the park on a sunny afternoon while a photo is taken",
    "hello <|endoftext|> world",
    "<|StartOfText|>A <|ENDOFTEXT|><|startoftext|>cat",
]


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable unicode map."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
      range(ord("\u00ae"), ord("\u00ff") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
  byte_encoder = bytes_to_unicode()
  symbols = list(byte_encoder.values())
  vocab_list = symbols + [s + "</w>" for s in symbols]
  merges: list[tuple[str, str]] = []
  for word in WORDS:
    pieces = [byte_encoder[b] for b in word.encode("utf-8")]
    pieces[-1] += "</w>"
    while len(pieces) > 1:  # merge left to right: ((c a) t</w>)
      pair = (pieces[0], pieces[1])
      if pair not in merges:
        merges.append(pair)
        vocab_list.append(pair[0] + pair[1])
      pieces = [pair[0] + pair[1]] + pieces[2:]
  vocab_list += ["<|startoftext|>", "<|endoftext|>"]
  vocab: dict[str, int] = {}
  for token in vocab_list:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def encode(tok, text: str) -> dict[str, list[int]]:
  enc = tok(text, padding="max_length", max_length=MAX_LENGTH, truncation=True)
  return {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"])}


def main() -> None:
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  vocab, merges = build_vocab_and_merges()
  with open(OUT / "vocab.json", "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(OUT / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

  direct = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
  direct.save_pretrained(OUT)
  # save_pretrained writes what the class has; keep only the slow layout, with our own
  # vocab.json / merges.txt (re-written in case save_pretrained replaced them).
  (OUT / "tokenizer.json").unlink(missing_ok=True)
  with open(OUT / "vocab.json", "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(OUT / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  assert not (OUT / "tokenizer.json").exists()

  # The files as openai/clip-vit-large-patch14 (and HunyuanVideo's tokenizer_2/) ship them, with
  # this vocabulary's ids: added_tokens_decoder in tokenizer_config.json (<|startoftext|>
  # normalized, <|endoftext|> not), special_tokens_map.json with AddedToken entries.
  # transformers 5.x's save_pretrained writes neither.
  bos_id, eos_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]

  def added(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}

  config = json.loads((OUT / "tokenizer_config.json").read_text(encoding="utf-8"))
  config.update({
      "add_prefix_space": False,
      "added_tokens_decoder": {
          str(bos_id): {**added("<|startoftext|>", True), "special": True},
          str(eos_id): {**added("<|endoftext|>", False), "special": True},
      },
      "clean_up_tokenization_spaces": True,
      "do_lower_case": True,
      "errors": "replace",
      "model_max_length": 77,
  })
  with open(OUT / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  with open(OUT / "special_tokens_map.json", "w", encoding="utf-8") as f:
    json.dump({"bos_token": added("<|startoftext|>", True), "eos_token": added("<|endoftext|>", False),
               "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>", False)}, f, indent=2)

  loaded = CLIPTokenizerFast.from_pretrained(OUT)
  assert loaded.pad_token == "<|endoftext|>", loaded.pad_token
  # The same folder without added_tokens_decoder and with plain-string special tokens (the layout
  # of older saves): every special token is then matched un-normalized, as when the class is
  # constructed directly.
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("vocab.json", "merges.txt"):
      shutil.copy(OUT / name, tmp)
    plain_config = {k: v for k, v in config.items() if k != "added_tokens_decoder"}
    with open(pathlib.Path(tmp) / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump(plain_config, f)
    with open(pathlib.Path(tmp) / "special_tokens_map.json", "w", encoding="utf-8") as f:
      json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    plain = CLIPTokenizerFast.from_pretrained(tmp)

  cases = []
  for text in PROMPTS:
    a, b, c = encode(loaded, text), encode(direct, text), encode(plain, text)
    assert b == c, (text, b, c)
    if "<|" not in text:  # the normalized <|startoftext|> of CLIP-L's config only shows here
      assert a == b, (text, a, b)
    cases.append({"text": text, "tokens": loaded.convert_ids_to_tokens(a["input_ids"]), **a,
                  "plain_config_input_ids": c["input_ids"]})
  with open(OUT / "io.json", "w", encoding="utf-8") as f:
    json.dump({"transformers": transformers.__version__, "max_length": MAX_LENGTH, "cases": cases},
              f, ensure_ascii=False, indent=1)
  for name in sorted(p.name for p in OUT.iterdir()):
    print(name, (OUT / name).stat().st_size)
  for case in cases:
    print(repr(case["text"]), case["input_ids"])
    if case["plain_config_input_ids"] != case["input_ids"]:
      print("  plain config:", case["plain_config_input_ids"])


if __name__ == "__main__":
  main()
