"""Train the default model's tokenizer the way Qwen's is built, with the ``tokenizers`` library.

* byte-level BPE (no unknown token: every byte is in the base alphabet), NFC normalisation,
* Qwen2/Qwen3's pre-tokenizer: the same split regex (digits one at a time, letters with one leading
  non-letter, punctuation runs, newline runs), then ByteLevel without its own regex,
* Qwen's 26 added tokens in Qwen's order right after the learned vocabulary, with Qwen's ``special`` flags
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the vision/box markers are special; ``<tool_call>``,
  ``<think>``, FIM and ``<tool_response>`` markers are added but not special, so they survive
  ``skip_special_tokens``), exactly as in Qwen3's tokenizer.json where they follow the 151,643 BPE tokens,
* tokenizer_config.json with Qwen's fields (eos ``<|im_end|>``, pad ``<|endoftext|>``) and Qwen3's chat
  template (qwenlab/templates/qwen3.jinja), generation_config.json with Qwen3's eos pair.

    python scripts/train_tokenizer.py --corpora build/default/corpora --sft build/default/sft/train.jsonl \
        --vocab-size 8192 --out build/default/tokenizer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
# (content, special) in Qwen's id order: 151643 + index in Qwen3's tokenizer.json.
QWEN_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
              ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
              ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
              ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
              ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
              ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
              ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]


def texts(corpora: Path, sft: list[Path], budget: int):
    """Training text: the pretraining corpora (train splits) up to ``budget`` characters, plus SFT chats."""
    used = 0
    for name in ("prose-train.jsonl", "code-train.jsonl"):
        for line in open(corpora / name, encoding="utf-8"):
            text = json.loads(line)["text"]
            used += len(text)
            yield text
            if used > budget:
                break
        used = 0
    for path in sft:
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            for message in record["messages"]:
                yield (message.get("reasoning_content") or "") + "\n" + (message.get("content") or "")
                for call in message.get("tool_calls") or []:
                    yield json.dumps(call["function"], ensure_ascii=False)


def build(corpora: Path, sft: list[Path], vocab_size: int, out: Path, budget: int = 6_000_000) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = None
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_ADDED), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts(corpora, sft, budget), trainer=trainer)
    base = tokenizer.get_vocab_size(with_added_tokens=False)
    for content, special in QWEN_ADDED:  # one at a time so the ids follow Qwen's order
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(tokenizer.to_str())
    # Qwen's post-processor is ByteLevel (a no-op for ids and offsets); keep the file shaped like theirs.
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False}
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    ids = {content: base + i for i, (content, _) in enumerate(QWEN_ADDED)}
    template = (Path(__file__).resolve().parents[1] / "qwenlab" / "templates" / "qwen3.jinja").read_text()
    config = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": s} for c, s in QWEN_ADDED},
        "additional_special_tokens": [c for c, s in QWEN_ADDED if s and c != "<|endoftext|>"],
        "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 4096, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    generation = {"bos_token_id": ids["<|endoftext|>"], "do_sample": True,
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
                  "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    print(f"tokenizer: {base} BPE tokens + {len(QWEN_ADDED)} added = {base + len(QWEN_ADDED)} -> {out}",
          file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default="build/default/corpora")
    p.add_argument("--sft", nargs="*", default=[])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", default="build/default/tokenizer")
    args = p.parse_args(argv)
    build(Path(args.corpora), [Path(s) for s in args.sft], args.vocab_size, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
