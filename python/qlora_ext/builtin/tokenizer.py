"""`ByteTokenizer`: UTF-8 bytes as token ids 0..255, plus BOS, EOS and PAD (vocabulary 259).

Prompts are formatted as ``<BOS>{prompt}\n`` and answers as ``{answer}<EOS>``; a chat is a list of
``{"role", "content"}`` messages, each written as ``{role}: {content}\n``.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; stops at nothing, drops special ids (or shows them as <bos> etc.)."""
        out = bytearray()
        names = {self.bos_token_id: b"<bos>", self.eos_token_id: b"<eos>", self.pad_token_id: b"<pad>"}
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in names:
                if not skip_special_tokens:
                    out += names[i]
            else:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})")
        return out.decode("utf-8", errors="replace")

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees before its answer."""
        return prompt + "\n"

    def format_chat(self, messages: Sequence[dict]) -> tuple[str, str]:
        """(prompt text, answer text) of a chat whose last message is the assistant's answer."""
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
        return prompt + f"{messages[-1]['role']}: ", messages[-1]["content"]
