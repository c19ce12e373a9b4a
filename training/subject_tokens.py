"""Tokenize a caption and find each subject's token: the LAST token of its noun phrase.

FastComposer's placeholder trick: insert a placeholder token right after each subject phrase's
``end``, tokenize, flag the token just before each placeholder, remove the placeholders, then
pad to the text encoder's context (77 for CLIP). The placeholder is an added special token, so
the CLIP tokenizer never merges it with the neighbouring word.

Long captions are cut to fit ``<|startoftext|> content <|endoftext|>`` into the context (the
usual Stable Diffusion truncation keeps the end token); a subject whose token falls beyond the cut
gets no position (``None``) and is dropped by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PLACEHOLDER = "<|subject|>"


class SubjectTokenizer:
    def __init__(self, tokenizer, placeholder: str = PLACEHOLDER):
        """``tokenizer``: a CLIP tokenizer; it is given the placeholder as an added special token."""
        self.tokenizer = tokenizer
        self.placeholder = placeholder
        tokenizer.add_tokens([placeholder], special_tokens=True)
        self.placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
        self.max_length = int(tokenizer.model_max_length)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if self.max_length > 10_000 or self.bos_id is None or self.eos_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} lacks a context length or start/end tokens "
                f"(model_max_length={tokenizer.model_max_length}, bos={self.bos_id}, eos={self.eos_id}); "
                "a CLIP tokenizer is expected"
            )

    def __call__(self, caption: str, ends: Sequence[int]) -> tuple[torch.Tensor, list[int | None]]:
        """Return ``(input_ids, positions)``: ids padded to the context length (int64) and, for each
        phrase end in ``ends`` (strictly increasing character offsets into ``caption``), the index
        of the phrase's last token in ``input_ids`` (``None`` when truncated away)."""
        if any(b <= a for a, b in zip(ends, ends[1:], strict=False)):
            raise ValueError(f"phrase ends must be strictly increasing, got {list(ends)}")
        if ends and not (0 < ends[0] and ends[-1] <= len(caption)):
            raise ValueError(f"phrase ends {list(ends)} are not inside the caption (length {len(caption)})")
        text = caption
        for end in reversed(ends):
            text = text[:end] + self.placeholder + text[end:]
        ids = self.tokenizer(text, add_special_tokens=False).input_ids

        clean: list[int] = []
        marked: list[int | None] = []
        for token in ids:
            if token == self.placeholder_id:
                marked.append(len(clean) - 1 if clean else None)
            else:
                clean.append(token)
        if len(marked) != len(ends):
            raise ValueError(f"caption {caption!r}: found {len(marked)} placeholders for {len(ends)} phrase ends")

        room = self.max_length - 2  # start and end tokens
        content = clean[:room]
        input_ids = [self.bos_id, *content, self.eos_id]
        input_ids += [self.pad_id] * (self.max_length - len(input_ids))
        positions = [None if (p is None or p >= room) else p + 1 for p in marked]
        # Two phrases whose last tokens coincide (e.g. one ends inside a word) cannot both bind.
        seen: set[int] = set()
        for i, p in enumerate(positions):
            if p is not None:
                if p in seen:
                    positions[i] = None
                seen.add(p)
        return torch.tensor(input_ids, dtype=torch.long), positions

    def plain(self, caption: str) -> torch.Tensor:
        """Token ids of a caption without subjects (same truncation and padding)."""
        return self(caption, [])[0]
