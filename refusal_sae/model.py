"""The language model of the activation-collection stage: loading, chat formatting, residual-stream hooks.

`ModelWrapper` loads a causal LM and its tokenizer (safetensors or GGUF only, never pickles), turns
prompts into one-user-turn chat inputs, and reads the residual stream at chosen layers.

Layer names
    `residuals_<i>` is the residual stream after decoder block i, i.e. the output of
    `model.model.layers[i]` (the decoder layer list is found generically, through
    `model.get_decoder().layers`). The module hooked is, per family:

    * Llama / Mistral: `LlamaForCausalLM.model.layers[i]`, a `LlamaDecoderLayer` (`MistralDecoderLayer`);
    * Qwen2 (the embedded Qwen2.5-Coder-0.5B-Instruct): `Qwen2ForCausalLM.model.layers[i]`, a `Qwen2DecoderLayer`;
    * Gemma / Gemma2: `GemmaForCausalLM.model.layers[i]`, a `GemmaDecoderLayer` (`Gemma2DecoderLayer`).

    A forward hook reads the block's output: in transformers 5.x a decoder layer returns the hidden
    state tensor itself, in older versions a tuple whose first element is the hidden state; both are
    handled. Relation to `output_hidden_states=True`: `hidden_states[0]` is the embedding output and
    `hidden_states[i + 1] == residuals_<i>` for every block but the last; `hidden_states[-1]` is taken
    AFTER the final norm (`model.model.norm`), whereas `residuals_<n_layers - 1>` is the last block's
    output BEFORE that norm.

Early stop
    `residuals` raises a private exception from the hook of the deepest requested block and catches
    it, so later blocks, the final norm and the lm_head never run: collecting layer 12 of a 32-layer
    model costs 13 blocks, not 32 plus a vocabulary-sized matmul.

Padding
    Prompts are padded on the RIGHT. With causal attention a real token never attends to a later
    position, so a prompt's real-token residuals do not depend on what it is batched with; the padded
    positions hold garbage and must be masked out with `attention_mask` by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from refusal_sae.embedded import GGUF_SHA256, embedded_model_dir
from refusal_sae.errors import UserError
from refusal_sae.io import sha256_file
from refusal_sae.loading import (
    dtype_name,
    file_stamps,
    hub_commit,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from refusal_sae.validate import positive_int

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
LAYER_PREFIX = "residuals_"
_LAYER_RE = re.compile(rf"{LAYER_PREFIX}(-?\d+)")


@dataclass
class ModelConfig:
    """Which language model produces the activations and how prompts are fed to it (the `data.model` options)."""

    name: str = EMBEDDED
    """'embedded' (bundled Qwen2.5-Coder-0.5B-Instruct), a hub id, a local directory, or a path to a .gguf file."""
    revision: str | None = None
    """Hub revision (commit, branch or tag) to pin, for hub ids."""
    gguf_file: str | None = None
    """GGUF file name inside the hub repo or directory given as name; null loads safetensors."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint; leave off unless you trust its author."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'float16' or 'bfloat16'."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    chat_template: str | None = None
    """Jinja chat template (or a path to a .jinja file) overriding the tokenizer's; null uses the tokenizer's."""
    max_length: int = 256
    """Longest prompt in tokens, chat template included; a longer prompt is an error, not truncated."""

    def __post_init__(self) -> None:
        positive_int("data.model.max_length", self.max_length, 256)


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block to end the forward pass early."""


def _compact(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]}"


def first_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------
# The wrapper


class ModelWrapper:
    """A causal LM in eval mode with gradients off, its tokenizer, and residual-stream hooks.

    Attributes: `model` (the `AutoModelForCausalLM`), `tokenizer` (right padding, pad = eos if it had
    none), `cfg`, `device`, `dtype`, `n_layers`, `d_model`, `chat_template` (the template text used,
    or None if there is none), `prefix_continues`.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        source, gguf_file, local = self._resolve_source()
        self._source, self._gguf_file, self._local = source, gguf_file, local
        self._gguf_hash: str | None = None
        # stamped before loading: a file rewritten while it loads differs from the stamp at the next run
        local_dir = local and gguf_file is None and cfg.name != EMBEDDED
        self._files = file_stamps(Path(source)) if local_dir else None

        t0 = time.perf_counter()
        try:
            model, tokenizer = load_causal_lm(
                source, self.dtype, gguf_file=gguf_file, revision=cfg.revision, local_files_only=local,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (ValueError, RuntimeError) as e:  # a tokenizer that cannot be built; a weight of another shape
            what = ("a weight's shape is not the one its config.json describes" if "mismatch" in str(e) else
                    "its tokenizer cannot be built" if "tokenizer" in str(e).lower() else None)
            if what is None:
                raise
            advice = ("a GGUF file written with its architecture and tokenizer metadata" if gguf_file else
                      "the whole directory save_pretrained wrote (config.json, tokenizer files, *.safetensors)")
            raise UserError(f"data.model.name: {cfg.name!r}: {what} ({first_line(e)}); give {advice}, or download "
                            "it again") from None
        except OSError as e:
            if gguf_file is None and "safetensors" in str(e):
                raise UserError(
                    f"data.model.name: {cfg.name!r} has no safetensors weights; only safetensors or GGUF "
                    f"checkpoints are loaded (never pickles), so convert it or pick a safetensors revision"
                ) from None
            where = "" if local else " (no network and not in the hub cache?)"
            raise UserError(
                f"data.model.name: cannot load model {cfg.name!r}{where}: {first_line(e)}; check the model id "
                f"and revision, the network, or give a local directory holding config.json, tokenizer and *.safetensors"
            ) from None
        self._commit = None if local else hub_commit(source, gguf_file or "config.json", cfg.revision)
        if not local and self._commit is None:
            log.warning("cannot tell which commit of %s was loaded: its activation cache will not notice a new "
                        "commit on the hub; pin data.model.revision to a commit", cfg.name)
        model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        log.info("model %s loaded in %.1fs (%s, %s)", cfg.name, time.perf_counter() - t0, self.dtype, self.device)

        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(f"data.model.name: the tokenizer of {cfg.name!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.chat_template = self._resolve_chat_template()

        self._decoder, self._layers = self._find_layers()
        self.n_layers = len(self._layers)
        self.prefix_continues: bool | None = None
        """Whether continuing a shared prefix's keys and values reproduces a plain forward on this model: None
        until `refusal_sae.prefix` first checks it, on the first batch that asks."""
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.d_model = int(text_config.hidden_size)

    # ---------------------------------------------------------------------------------------------
    # loading helpers

    def _resolve_source(self) -> tuple[str, str | None, bool]:
        """(what to pass to from_pretrained, gguf_file, whether it is local), after checking local paths."""
        if self.cfg.name != EMBEDDED:
            return resolve_source(self.cfg.name, self.cfg.gguf_file)
        if self.cfg.gguf_file is not None:
            raise UserError(
                "data.model.gguf_file: not used with name 'embedded' (already converted to safetensors); "
                "set it to null"
            )
        return str(embedded_model_dir()), None, True

    def _resolve_chat_template(self) -> str | None:
        override = self.cfg.chat_template
        if override:
            if len(override) < 4096 and "{" not in override and override.endswith((".jinja", ".j2")):
                path = Path(override).expanduser()
                if not path.is_file():
                    raise UserError(f"data.model.chat_template: template file {override!r} not found")
                return path.read_text(encoding="utf-8")
            return override
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one is for plain chat
            template = template.get("default")
        return template or None

    def _find_layers(self) -> tuple[nn.Module, nn.ModuleList]:
        """(the module whose forward runs the blocks, its decoder layer list)."""
        owners = []
        with contextlib.suppress(Exception):
            owners.append(self.model.get_decoder())
        owners += [getattr(self.model, "model", None), getattr(self.model, "base_model", None)]
        for owner in owners:
            layers = getattr(owner, "layers", None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return owner, layers
        raise UserError(
            f"data.model.name: {self.cfg.name!r} ({type(self.model).__name__}) has no decoder layer list "
            f"(model.model.layers); use a Llama, Mistral, Qwen2 or Gemma style causal LM"
        )

    # ---------------------------------------------------------------------------------------------
    # public API

    @property
    def layer_names(self) -> list[str]:
        """`["residuals_0", ..., f"residuals_{n_layers - 1}"]`."""
        return [f"{LAYER_PREFIX}{i}" for i in range(self.n_layers)]

    @property
    def identity(self) -> dict[str, Any]:
        """What produced the activations, JSON-serialisable, for a cache manifest."""
        return {
            "name": self.cfg.name,
            "revision": self.cfg.revision,
            "commit": self._commit,
            "files": self._files,
            "gguf_file": self._gguf_file,
            "gguf_sha256": self._gguf_sha256(),
            "model_type": self.model.config.model_type,
            "architecture": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": dtype_name(self.dtype),
            "chat_template": self.chat_template,
            "max_length": self.cfg.max_length,
        }

    def _gguf_sha256(self) -> str | None:
        """The pinned hash for 'embedded'; the file's sha256 for a local GGUF (computed once); else None."""
        if self.cfg.name == EMBEDDED:
            return GGUF_SHA256
        if self._gguf_file is None or not self._local:
            return None  # a hub GGUF is identified by revision/commit
        if self._gguf_hash is None:
            self._gguf_hash = sha256_file(Path(self._source) / self._gguf_file)
        return self._gguf_hash

    def resolve_layers(self, layers: Sequence[str | int]) -> list[str]:
        """Layer names for `layers` ("residuals_21", 21 or -3), sorted by depth, without duplicates."""
        if isinstance(layers, (str, int)):
            layers = [layers]
        indices = set()
        for layer in layers:
            index = None
            if isinstance(layer, int) and not isinstance(layer, bool):
                index = layer
            elif isinstance(layer, str):
                m = _LAYER_RE.fullmatch(layer.strip())
                if m:
                    index = int(m.group(1))
                    if index < 0:
                        index = None  # names are never negative; only bare ints count from the end
                elif re.fullmatch(r"-?\d+", layer.strip()):
                    index = int(layer)
            if index is not None and -self.n_layers <= index < self.n_layers:
                indices.add(index % self.n_layers)
                continue
            raise UserError(
                f"unknown layer {layer!r}: {self.cfg.name!r} has {self.n_layers} layers, "
                f"valid names {_compact(self.layer_names)} (or indices {-self.n_layers} .. {self.n_layers - 1})"
            )
        return [f"{LAYER_PREFIX}{i}" for i in sorted(indices)]

    def format_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as one user turn plus the generation prompt, rendered with the chat template."""
        if self.chat_template is None:
            raise UserError(
                f"data.model.chat_template: the tokenizer of {self.cfg.name!r} has no chat template; "
                f"set data.model.chat_template to a Jinja template"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
            for prompt in prompts
        ]

    def tokenize(self, prompts: Sequence[str], padding_side: Literal["left", "right"] = "right"):
        """Chat-format `prompts` and tokenize them, tensors on CPU; longer than max_length is an error.

        Right padding (the default) keeps every prompt's positions from 0, as activations need; left
        padding lines the last tokens up, as batched generation needs.

        Returns a `BatchEncoding` with `input_ids` and `attention_mask` of shape (batch, longest).
        No special tokens are added: the template already holds them.
        """
        return self.pad(self.encode(prompts), padding_side)

    def pad(self, ids: Sequence[Sequence[int]], padding_side: Literal["left", "right"] = "right"):
        """`encode`'s token ids as a padded `BatchEncoding` (see `tokenize`), for a caller that needs the ids of
        the whole prompt list before it batches them; longer than max_length is an error."""
        if not ids:
            from transformers import BatchEncoding

            empty = torch.zeros((0, 0), dtype=torch.long)
            return BatchEncoding({"input_ids": empty, "attention_mask": empty.clone()})
        max_length = self.cfg.max_length
        too_long = [len(row) for row in ids if len(row) > max_length]
        if too_long:
            raise UserError(
                f"data.model.max_length: {len(too_long)} of {len(ids)} prompts are longer than {max_length} "
                f"tokens (longest {max(too_long)}, chat template included); raise data.model.max_length "
                "(truncating would cut off the generation prompt, the position where the model decides)"
            )
        return self.tokenizer.pad({"input_ids": ids}, padding=True, padding_side=padding_side, return_tensors="pt")

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each chat-formatted prompt, unpadded.

        Text of the prompt itself never becomes a control token: a prompt containing `<|im_end|>` or
        `<|eot_id|>` gets those characters as plain text (as chat UIs tokenize user input), so it cannot
        close its turn and fake the assistant's; only the template's own tokens are special. A prompt
        without such text is tokenized exactly as its whole formatted string.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = self.format_prompts(prompts)
        ids = [list(row) for row in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        controls = {t.content for t in added.values() if t.special} | set(self.tokenizer.all_special_tokens)
        for i, prompt in enumerate(prompts):
            if any(token in prompt for token in controls):
                ids[i] = self._encode_as_text(prompt, texts[i])
        return ids

    def _encode_as_text(self, prompt: str, text: str) -> list[int]:
        """`text`, the formatted `prompt`, tokenized with the template's special tokens but `prompt` inside it as
        plain text (`split_special_tokens`)."""
        marker = "\ue000"  # a private-use character: in no template, so it shows where the message goes
        before, found, after = self.format_prompts([marker])[0].partition(marker)
        if not found or marker in after or before + prompt + after != text:
            raise UserError(
                f"data.model.chat_template: the prompt {prompt[:60]!r} contains a special token of the tokenizer as "
                "text, and the chat template does not insert messages verbatim, so it cannot be kept as plain text; "
                "remove that text from the prompt's row"
            )
        tok = self.tokenizer
        return [*tok(before, add_special_tokens=False)["input_ids"],
                *tok(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"],
                *tok(after, add_special_tokens=False)["input_ids"]]

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        input_ids = torch.as_tensor(input_ids).to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return input_ids, torch.as_tensor(attention_mask).to(self.device)

    @torch.no_grad()
    def residuals(self, input_ids: Tensor, attention_mask: Tensor | None, layers: Sequence[str | int],
                  past: Any = None) -> dict[str, Tensor]:
        """{layer: (batch, seq, d_model)} residual stream after each requested block, in depth order.

        Tensors are in the model's dtype on its device; padded positions hold garbage. The forward
        pass stops right after the deepest requested block. With `past` (a `prefix_cache` expanded to the
        batch, left untouched), `input_ids` continue that prefix and `attention_mask` covers prefix and
        continuation.
        """
        names = self.resolve_layers(layers)
        if not names:
            raise UserError("no layers asked for; give at least one, e.g. residuals_0")
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        indices = [int(n.removeprefix(LAYER_PREFIX)) for n in names]
        last = indices[-1]
        out: dict[str, Tensor] = {}

        def make_hook(name: str, stop: bool):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                out[name] = hidden.detach()
                if stop:
                    raise _StopForward

            return hook

        handles = [
            self._layers[i].register_forward_hook(make_hook(name, i == last)) for i, name in zip(indices, names)
        ]
        try:
            self._decoder(input_ids=input_ids, attention_mask=attention_mask, **self._continuation(past, input_ids))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in names if n not in out]
        if missing:  # the forward ended without reaching a hooked block: a bug, not a user mistake
            raise RuntimeError(f"hooks on {missing} never fired; is {type(self._decoder).__name__} a plain decoder?")
        return {name: out[name] for name in names}

    @contextlib.contextmanager
    def edit_residuals(self, edits: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
        """Within the block, replace the residual stream after each layer in `edits` by `edit(hidden)`.

        Hooks fire in depth order during one forward pass, so an edit at a deeper layer sees the
        stream as the shallower edits left it (how ablations at several SAE layers compose).
        """
        names = self.resolve_layers(list(edits))

        def make_hook(edit: Callable[[Tensor], Tensor]):
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                if isinstance(output, (tuple, list)):
                    return (edit(output[0]), *output[1:])
                return edit(output)

            return hook

        handles = [
            self._layers[int(name.removeprefix(LAYER_PREFIX))].register_forward_hook(make_hook(edits[name]))
            for name in names
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def last_token_logits(self, input_ids: Tensor, attention_mask: Tensor | None, past: Any = None) -> Tensor:
        """(batch, vocab) float32 logits at each prompt's last real token.

        Runs the base model (all blocks + final norm), gathers the last real position of each row
        (the last 1 of `attention_mask`, so right or left padding both work) and applies the lm_head to
        those positions only.

        With `past` (the shared prefix's keys and values, `refusal_sae.prefix`, left untouched) `input_ids` are only the
        positions after the prefix every row shares, and `attention_mask` covers prefix and continuation:
        then the rows must be RIGHT-padded, so that each one's prefix sits at positions 0 .. P-1 and its
        continuation right after it (left padding would put pad tokens between the two), and every row needs
        a real token after the prefix.
        """
        return self.last_token_logits_with_grad(input_ids, attention_mask, past)

    def last_token_logits_with_grad(self, input_ids: Tensor, attention_mask: Tensor | None, past: Any = None
                                    ) -> Tensor:
        """`last_token_logits` with autograd left as the caller set it, for attribution: the model's
        parameters never require grad, so a graph exists only from tensors a hook made require grad
        (e.g. SAE features spliced into the residual stream by `edit_residuals`)."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        output = self._decoder(input_ids=input_ids, attention_mask=attention_mask,
                               **self._continuation(past, input_ids))
        return self._head_at_last(output, attention_mask)

    @torch.no_grad()
    def _run_after(self, hidden: Tensor, attention_mask: Tensor | None, after_layer: str | int,
                   past: Any = None) -> tuple[Any, Tensor]:
        """(the base model's output, the attention mask) running only the blocks after `after_layer`.

        `hidden` (batch, seq, d_model), in the model's dtype, is taken as the residual stream after
        block `after_layer` (e.g. `residuals(...)[after_layer]`, possibly edited); blocks after_layer+1 ..
        end and the final norm run on it. Forward hooks on the blocks that run (`edit_residuals`) fire; one on
        block `after_layer` itself or earlier does not: apply that edit to `hidden` first.

        How: the base model runs with `inputs_embeds=hidden` and its layer list temporarily swapped for
        one of the SAME length whose blocks 0 .. after_layer are stand-ins that skip the work and emit
        `hidden`; so masks (padding + causal, sliding windows), rotary embeddings, per-layer settings
        indexed by position (`config.layer_types[i]`, `layers[:num_hidden_layers]`) and the final norm
        all come from the model's own code, and an input scaling of the embeddings (Gemma) is discarded.

        With `past` (the shared prefix's keys and values, `refusal_sae.prefix`, left untouched) `hidden` holds only the
        positions after the shared prefix, whose keys and values the blocks read from `past`;
        `attention_mask` covers prefix and continuation.
        """
        index = int(self.resolve_layers([after_layer])[0].removeprefix(LAYER_PREFIX))
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(self.device)
        hidden = torch.as_tensor(hidden).to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=self.device)
        tuple_output = getattr(self, "_block_output_is_tuple", None)
        if tuple_output is None:  # transformers < ~4.54 blocks return (hidden, ...): find out once, on one token
            seen: list[bool] = []

            def probe(module: nn.Module, args: Any, output: Any) -> None:
                seen.append(isinstance(output, (tuple, list)))
                raise _StopForward

            handle = self._layers[0].register_forward_hook(probe)
            try:
                self._decoder(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
            tuple_output = self._block_output_is_tuple = bool(seen and seen[0])

        class StandIn(nn.Module):
            """Block i <= after_layer: does no work, emits `hidden`; other attributes are the real block's."""

            def __init__(self, block: nn.Module) -> None:
                super().__init__()
                object.__setattr__(self, "_real", block)  # not a submodule

            def __getattr__(self, name: str) -> Any:  # e.g. `attention_type`, read by some decoders' loops
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(object.__getattribute__(self, "_real"), name)

            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return (hidden,) if tuple_output else hidden

        original = self._decoder.layers
        swapped = nn.ModuleList([StandIn(b) if i <= index else b for i, b in enumerate(original)])
        try:
            self._decoder.layers = swapped
            output = self._decoder(inputs_embeds=hidden, attention_mask=attention_mask,
                                   **self._continuation(past, hidden))
        finally:
            self._decoder.layers = original
        return output, attention_mask

    def suffix_last_token_logits(self, hidden: Tensor, attention_mask: Tensor | None, after_layer: str | int,
                                 past: Any = None) -> Tensor:
        """(batch, vocab) float32 logits at each row's last real token, running only the blocks after `after_layer`
        (`suffix_final_hidden`; the head at the last real position only, softcapped like `last_token_logits`).
        Without edits the result equals `last_token_logits` of the same batch."""
        return self._head_at_last(*self._run_after(hidden, attention_mask, after_layer, past))

    def suffix_final_hidden(self, hidden: Tensor, attention_mask: Tensor | None, after_layer: str | int,
                            past: Any = None) -> Tensor:
        """(batch, seq, d_model) the base model's output (after the final norm) at every position, running only the
        blocks after `after_layer` on `hidden` (see `_run_after`), for the head at chosen positions (`unembed`).
        Without edits it equals `final_hidden` of the same batch."""
        output, _ = self._run_after(hidden, attention_mask, after_layer, past)
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def final_hidden(self, input_ids: Tensor, attention_mask: Tensor, past: Any = None) -> Tensor:
        """(batch, positions that run, d_model) the base model's output (after the final norm), for the head at
        chosen positions (`unembed`); autograd as the caller set it. `past` as for `last_token_logits`."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        output = self._decoder(input_ids=input_ids, attention_mask=attention_mask,
                               **self._continuation(past, input_ids))
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    @property
    def decoder(self) -> nn.Module:
        """The module whose forward runs the decoder blocks (the base model without the head)."""
        return self._decoder

    @property
    def cache_argument(self) -> str:
        """The decoder's name for its key/value cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
        import inspect

        return "cache" if "cache" in inspect.signature(self._decoder.forward).parameters else "past_key_values"

    def _continuation(self, past: Any, inputs: Tensor) -> dict[str, Any]:
        """Decoder keyword arguments: no cache, or a private copy of `past` continued at its length."""
        if past is None:
            return {"use_cache": False}
        import copy

        start = past.get_seq_length()
        positions = torch.arange(start, start + inputs.shape[1], device=inputs.device)[None]
        return {"use_cache": True, self.cache_argument: copy.deepcopy(past), "position_ids": positions}

    def _head_at_last(self, output: Any, attention_mask: Tensor) -> Tensor:
        """(batch, vocab) float32 logits of the base model's `output` at each row's last real position
        (`attention_mask` may also cover a cached prefix before the output's positions)."""
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        attention_mask = attention_mask[:, attention_mask.shape[1] - hidden.shape[1]:]
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.unembed(hidden[rows, last])

    def unembed(self, hidden: Tensor) -> Tensor:
        """float32 logits of final-norm outputs `hidden` (..., d_model): the head, softcapped as the CausalLM does."""
        logits = self.model.get_output_embeddings()(hidden)
        text_config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
        softcap = getattr(text_config or self.model.config, "final_logit_softcapping", None)
        if softcap:  # Gemma 2/3 squash logits in their CausalLM forward; do the same here
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    @torch.no_grad()
    def logit_lens(self, vectors: Tensor) -> Tensor:
        """(n, vocab) float32 logits of residual-stream vectors (n, d_model) read as if they were the last
        block's output: the final norm, then the unembedding. For an SAE decoder direction these are the tokens
        its latent pushes the next-token prediction towards and away from (the logit lens)."""
        hidden = torch.as_tensor(vectors).to(self.device, self.dtype)
        norm = getattr(self._decoder, "norm", None)
        return self.unembed(norm(hidden) if norm is not None else hidden)


__all__ = ["LAYER_PREFIX", "ModelConfig", "ModelWrapper", "first_line"]
