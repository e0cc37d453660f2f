"""A request's ``prompt`` and ``negative_prompt``, read whole by the model or refused: never cut.

A CLIP text encoder reads a window of 77 tokens (its tokenizer's ``model_max_length``), its start
and end markers included; diffusers cuts a longer prompt there and only logs a warning, so a
request's ``max_prompt_length`` characters could say far more than the model ever read. Here:

- **SD 1.x/2.x and SDXL** (and their image-to-image and inpainting pipelines): a prompt that fits
  one window goes to diffusers as text, exactly as before. A longer ``prompt`` or
  ``negative_prompt`` is split into windows of 75 tokens (77 less the two markers), each encoded
  alone between its own markers and padded as the tokenizer pads, and the windows' encodings are
  joined along the sequence: the denoiser's cross-attention reads a sequence of any length. This is
  what AUTOMATIC1111's web UI, ComfyUI and compel do. Both prompts get as many windows as the
  longer needs (the shorter is padded with empty windows, as an empty prompt encodes). SDXL: each
  of its two encoders reads every window (penultimate layer, as diffusers does), and the pooled
  embedding, one vector by design, is that of the first window. An empty ``negative_prompt`` is
  zeros where the model says so (SDXL's ``force_zeros_for_empty_prompt``), as in diffusers.
- **Flux**: its T5 encoder reads up to 512 tokens (diffusers' ``max_sequence_length``, default and
  maximum); its CLIP encoder contributes one pooled vector from the first 77 tokens, by the model's
  design.
- **The limit**: at most :data:`MAX_WINDOWS` windows (600 tokens of 77-token windows), or 511 T5
  tokens for Flux (512 less the end marker). A longer prompt is a 422 naming the field:
  ``prompt: 700 tokens, the model reads at most 600``. Tokens are counted with the pipeline's own
  tokenizers (SDXL: both; the larger count), markers not included.

The tokenizers counted with are private copies: a fast tokenizer's padding and truncation settings
are state that two threads must not change at once, and the pipeline uses its own tokenizers under
the pipeline lock while requests are checked outside it.

torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import copy
import math
import threading
from typing import Any

from fal.exceptions import FieldException

# The most windows of a CLIP-encoded prompt: 8 x 75 = 600 tokens for 77-token windows.
MAX_WINDOWS = 8
# Flux's T5: diffusers' FluxPipeline max_sequence_length (its default and its maximum), end marker included.
FLUX_T5_TOKENS = 512
# (tokenizer, text encoder) attribute pairs of the CLIP-encoded families, in diffusers' order.
_CLIP_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class Prompts:
    """How the served model reads a request's prompts: what it can read (:meth:`check`) and what the
    pipeline is given for them (:meth:`inputs`).

    ``kind``: ``"sd"`` or ``"sdxl"`` (windowed CLIP encoding), ``"flux"`` (T5 limit), ``"window"``
    (another family: one window, refused beyond), ``"none"`` (no tokenizer: nothing to count)."""

    def __init__(self, kind: str, tokenizers: dict[str, Any], limit: int | None, window: int | None = None) -> None:
        self.kind, self.limit, self.window = kind, limit, window
        self._tokenizers = {name: copy.deepcopy(tokenizer) for name, tokenizer in tokenizers.items()}
        self._lock = threading.Lock()

    @classmethod
    def for_pipeline(cls, pipe: Any) -> Prompts:
        family = type(pipe).__name__
        if family.startswith("Flux") and getattr(pipe, "tokenizer_2", None) is not None:
            t5 = pipe.tokenizer_2
            return cls("flux", {"tokenizer_2": t5}, FLUX_T5_TOKENS - t5.num_special_tokens_to_add())
        clip = {name: getattr(pipe, name) for name, _ in _CLIP_ENCODERS if getattr(pipe, name, None) is not None}
        if not clip:
            return cls("none", {}, None)
        windows = {tokenizer.model_max_length for tokenizer in clip.values()}
        markers = max(tokenizer.num_special_tokens_to_add() for tokenizer in clip.values())
        window = min(windows)
        if family.startswith("StableDiffusion") and not family.startswith("StableDiffusion3") and len(windows) == 1:
            kind = "sdxl" if family.startswith("StableDiffusionXL") else "sd"
            return cls(kind, clip, MAX_WINDOWS * (window - markers), window)
        return cls("window", clip, window - markers if window < 10**6 else None, window)

    def count(self, text: str) -> int:
        """Tokens of ``text`` (markers not included): the most any of the model's tokenizers makes."""
        return max((len(ids) for ids in self._ids(text).values()), default=0)

    def check(self, field: str, text: str) -> None:
        """Refuse ``text`` (422 naming ``field``) when the model cannot read all of it."""
        if self.limit is None or not text:
            return
        tokens = self.count(text)
        if tokens > self.limit:
            raise FieldException(field=field, message=f"{field}: {tokens} tokens, the model reads at most {self.limit}",
                                 type="prompt_too_long")

    def inputs(self, pipe: Any, prompt: str, negative_prompt: str) -> dict[str, Any]:
        """The prompt arguments of a call of ``pipe``: the texts when they fit one window (diffusers
        encodes them), else their windowed embeddings (SD, SDXL). Call under the pipeline lock, with
        the request's LoRAs applied: this runs the text encoders."""
        texts = {"prompt": prompt, "negative_prompt": negative_prompt or None}
        if self.kind not in ("sd", "sdxl"):
            return texts
        ids, negative_ids = self._ids(prompt), self._ids(negative_prompt)
        per_window = self.window - 2
        longest = max(len(i) for i in [*ids.values(), *negative_ids.values()])
        if longest <= per_window:
            return texts
        windows = math.ceil(longest / per_window)
        if self.kind == "sd":
            return {"prompt_embeds": self._sd(pipe, ids, windows),
                    "negative_prompt_embeds": self._sd(pipe, negative_ids, windows)}
        embeds, pooled = self._sdxl(pipe, ids, windows)
        if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            import torch

            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = self._sdxl(pipe, negative_ids, windows)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    # ----------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> dict[str, list[int]]:
        """The token ids of ``text`` by each tokenizer (by its pipeline attribute name), markers not included."""
        with self._lock:
            return {name: tokenizer(text, add_special_tokens=False, verbose=False).input_ids if text else []
                    for name, tokenizer in self._tokenizers.items()}

    def windows(self, name: str, ids: list[int], windows: int) -> tuple[list[list[int]], list[list[int]]]:
        """``ids`` as ``windows`` windows of tokenizer ``name``, and their attention masks: each window
        its start marker, up to window - 2 tokens, its end marker and padding, as the tokenizer lays
        out a text that fits one window (an empty window: the markers alone, as an empty text)."""
        tokenizer, per_window = self._tokenizers[name], self.window - 2
        rows, masks = [], []
        for index in range(windows):
            row = [tokenizer.bos_token_id, *ids[index * per_window:(index + 1) * per_window], tokenizer.eos_token_id]
            padding = self.window - len(row)
            rows.append(row + [tokenizer.pad_token_id] * padding)
            masks.append([1] * len(row) + [0] * padding)
        return rows, masks

    def _tokens(self, name: str, ids: list[int], windows: int, encoder: Any) -> tuple[Any, Any]:
        """:meth:`windows` as tensors on ``encoder``'s device."""
        import torch

        rows, masks = self.windows(name, ids, windows)
        device = next(encoder.parameters()).device
        return (torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(masks, dtype=torch.long, device=device))

    def _sd(self, pipe: Any, ids: dict[str, list[int]], windows: int) -> Any:
        """SD's encoding of every window (the encoder's last layer, as diffusers' encode_prompt without
        clip_skip), joined: ``(1, windows x window, width)``."""
        import torch

        encoder = pipe.text_encoder
        tokens, mask = self._tokens("tokenizer", ids["tokenizer"], windows, encoder)
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        with torch.no_grad():
            hidden = encoder(tokens, attention_mask=mask if use_mask else None)[0]
        return hidden.reshape(1, windows * self.window, -1)

    def _sdxl(self, pipe: Any, ids: dict[str, list[int]], windows: int) -> tuple[Any, Any]:
        """SDXL's encoding of every window by each encoder (penultimate layer), joined along the
        sequence and the encoders' widths, and the first window's pooled vector (the last encoder's)."""
        import torch

        hidden, pooled = [], None
        with torch.no_grad():
            for name, encoder_name in _CLIP_ENCODERS:
                if name not in ids:
                    continue
                encoder = getattr(pipe, encoder_name)
                tokens, _ = self._tokens(name, ids[name], windows, encoder)
                output = encoder(tokens, output_hidden_states=True)
                if pooled is None and output[0].ndim == 2:
                    pooled = output[0][:1]
                hidden.append(output.hidden_states[-2].reshape(1, windows * self.window, -1))
        return torch.cat(hidden, dim=-1), pooled
