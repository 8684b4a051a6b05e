"""What a circuit's nodes are: a card per node and one self-contained HTML report per analysis.

A circuit is a list of (layer, latent, position class) numbers; a researcher needs to see what each latent
responds to before reading anything into it (Marks et al. label features by their top activating contexts;
sae_vis and Neuronpedia show the same as dashboards). Every node of every saved circuit gets a card:

    top contexts    the prompts where the latent is largest at the node's position class, every token's
                    activation (the cache holds every token of every prompt: one pass per layer, encoding
                    with the saved SAE and keeping only the circuits' latents)
    by category     per category and label (toxic / safe): the share of the class's tokens where the latent
                    fires and its mean there; for an error node, the mean norm of the SAE's error
    scores          importance and signed score in every circuit of every method (the saved node scores),
                    and which circuits (and shared cores) hold it
    logit lens      the tokens its decoder direction promotes and suppresses when read through the model's
                    final norm and unembedding (`ModelWrapper.logit_lens`)
    directions      its decoder direction's cosine with each refusal direction at its layer and the chosen
                    suffix position, when the analysis has the directions stage (`refusal_sae.directions`)

`build_report` makes the cards of each circuit's `CARD_NODES` most important nodes (one script per circuit,
`cards/<n>.js`, loaded by the page when the circuit is opened) and `index.html`: per circuit a layered graph
(columns: layer x position class; nodes sized by importance, coloured by signed score and labelled with the token
they fire on most and the token they promote most; each node's `EDGES_PER_NODE` strongest edges) that opens at the
smallest size reaching faithfulness 0.8 (at most `MAX_DEFAULT` nodes, else the top `DEFAULT_NODES`) with a size
control, and says "nothing measurable" instead of drawing a circuit whose F(M) - F(∅) does not lie above 0; the
curves, similarity and direction figures inlined, the results table and the metric's validity. The page needs no network: its script and style are this package's `report.js` / `report.css`,
inlined when it is built. Outside the page (the W&B table the analysis callback logs, `notebooks/02_run.ipynb`)
the cards are read back with `load_cards` and shown by `node_card_table`, one row per card with its top
contexts as HTML (`contexts_html`).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from refusal_sae.activations import SPLITS, ActivationCache
from refusal_sae.circuits import ERROR, Circuit, Edge, Node, NodeScores
from refusal_sae.data import PromptSample, Split
from refusal_sae.directions import DirectionsResult
from refusal_sae.editing import CategoryEdits
from refusal_sae.errors import UserError
from refusal_sae.io import from_json, to_json
from refusal_sae.layout import AnalysisLayout, DiscoveryRecord, RunLayout, Summary
from refusal_sae.model import ModelWrapper
from refusal_sae.overrefusal import UNEDITED, TradeoffResult
from refusal_sae.positions import PositionScheme
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.similarity import Similarity

TOP_CONTEXTS = 8
"""Prompts shown per node."""
LENS_TOKENS = 10
"""Tokens promoted and suppressed per node in the logit lens."""
CHUNK = 4096
"""Tokens encoded at once."""
CARD_NODES = 100
"""Nodes of each circuit, the most important first, that get a card (the size control's largest view with
cards): a reader opens a few dozen; cards for every node of a 300-node circuit made a 17 MB report."""
EDGES_PER_NODE = 3
"""Each node's strongest edges (by |weight|) kept in the page; the rest only hide the picture."""
DEFAULT_NODES = 30
"""Nodes a circuit opens with when its smallest size reaching faithfulness 0.8 is unknown or above MAX_DEFAULT."""
MAX_DEFAULT = 50
"""The largest faithful size a circuit opens at."""
LABEL_CHARS = 10
"""Characters of each part of a node's label."""
CARDS_CALLBACK = "refusalReportCards"
"""The function each card script calls with its circuit's cards (report.js defines it)."""
LABELS = ("safe", "toxic")


@dataclass
class Context:
    """One of a node's top prompts."""

    prompt: int
    """Index of the prompt in the cache (its `prompts` entry in the report)."""
    peak: float
    """The largest value at the node's position class in this prompt."""
    values: list[list[float]]
    """[position, value] of every token where the latent fires (an error node: its error norm, every token)."""


@dataclass
class GroupStats:
    category: str
    label: str
    n_tokens: int
    """Tokens of the node's position class in this category and label."""
    density: float | None
    """Share of those tokens where the latent fires (None for an error node)."""
    mean: float
    """Mean activation over those tokens (an error node: the mean norm of the SAE's error)."""


@dataclass
class NodeScore:
    method: str
    circuit: str
    importance: float
    score: float | None
    in_circuit: bool


@dataclass
class NodeCard:
    name: str
    layer: str
    feature: int
    position: str
    circuits: list[str]
    """`method/circuit` of every saved circuit holding the node."""
    shared_core: list[str]
    """Methods whose shared core (similarity stage) holds it."""
    scores: list[NodeScore]
    stats: list[GroupStats]
    contexts: list[Context]
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    cosines: dict[str, float] = field(default_factory=dict)
    """Cosine of the decoder direction with each refusal direction (global, categories)."""


# --------------------------------------------------------------------------------------------------
# node cards


@dataclass
class TokenTable:
    """Every cached token's prompt, node class (-1: shared prefix) and (category, label) group."""

    prompt: np.ndarray
    position: np.ndarray
    node_class: np.ndarray
    group: np.ndarray
    """category index * 2 + label (1: toxic)."""
    starts: np.ndarray
    """First row of each prompt (rows are in prompt order)."""
    prompts: np.ndarray
    """The prompt index of each run of rows that `starts` begins."""


def token_table(cache: ActivationCache, scheme: PositionScheme) -> TokenTable:
    """The cache's token metadata, with every token's position class (`positions.PositionScheme`)."""
    meta = np.concatenate([np.asarray(cache.tokens(i)) for i in range(len(cache.shards))])
    prompt = meta["prompt_index"].astype(np.int64)
    if len(prompt) and np.any(np.diff(prompt) < 0):
        raise UserError(f"{cache.dir}: tokens are not in prompt order; delete the cache and run `fit` again")
    starts = np.flatnonzero(np.r_[True, np.diff(prompt) != 0]) if len(prompt) else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, len(prompt)])
    classes = np.concatenate([scheme.classes(int(n)) for n in lengths]) - scheme.prefix if len(prompt) else prompt
    group = meta["category"].astype(np.int64) * 2 + meta["refusal_label"].astype(np.int64)
    return TokenTable(prompt, meta["position"].astype(np.int64), classes, group, starts, prompt[starts])


@torch.no_grad()
def encode_layer(cache: ActivationCache, layer: str, sae: SparseAutoencoder, latents: np.ndarray,
                 errors: bool) -> tuple[sparse.csc_matrix, np.ndarray | None]:
    """One pass over the cache's tokens at `layer`: the activations of `latents` only, as a sparse (tokens,
    latents) matrix (a top-k SAE fires k latents per token, so this stays small), and, with `errors`, every
    token's error norm |x - decode(encode(x))|."""
    rows, cols, vals, norms = [], [], [], []
    offset = 0
    index = torch.from_numpy(latents)
    for shard in range(len(cache.shards)):
        acts = cache.activations(shard, layer)
        for start in range(0, len(acts), CHUNK):
            x = cache.to_torch(acts[start : start + CHUNK]).float()
            f = sae.encode(x)
            picked = f[:, index]
            r, c = picked.nonzero().unbind(1)
            rows.append((r + offset).numpy())
            cols.append(c.numpy())
            vals.append(picked[r, c].numpy())
            if errors:
                norms.append((x - sae.decode(f)).norm(dim=-1).numpy())
            offset += len(x)
    matrix = sparse.csc_matrix((np.concatenate(vals or [np.zeros(0, np.float32)]),
                                (np.concatenate(rows or [np.zeros(0, np.int64)]),
                                 np.concatenate(cols or [np.zeros(0, np.int64)]))), shape=(offset, len(latents)))
    return matrix, (np.concatenate(norms) if errors else None)


def node_statistics(values: np.ndarray, tokens: TokenTable, node_class: int, categories: Sequence[str],
                    is_error: bool, top: int = TOP_CONTEXTS) -> tuple[list[GroupStats], list[Context]]:
    """Per (category, label) density and mean of `values` (one per cached token) over the tokens of
    `node_class`, and the `top` prompts where it is largest there."""
    at = tokens.node_class == node_class
    n_groups = 2 * len(categories)
    counts = np.bincount(tokens.group[at], minlength=n_groups)
    sums = np.bincount(tokens.group[at], weights=values[at], minlength=n_groups)
    fired = np.bincount(tokens.group[at & (values > 0)], minlength=n_groups)
    stats = [GroupStats(categories[g // 2], LABELS[g % 2], int(counts[g]),
                        None if is_error else float(fired[g] / counts[g]), float(sums[g] / counts[g]))
             for g in range(n_groups) if counts[g]]
    peaks = np.maximum.reduceat(np.where(at, values, 0.0), tokens.starts) if len(values) else np.zeros(0)
    order = [i for i in np.argsort(-peaks, kind="stable")[:top] if peaks[i] > 0]
    contexts = []
    for i in order:
        start = tokens.starts[i]
        end = tokens.starts[i + 1] if i + 1 < len(tokens.starts) else len(values)
        fires = start + np.flatnonzero(values[start:end] > 0)
        contexts.append(Context(int(tokens.prompts[i]), float(peaks[i]),
                                [[int(tokens.position[t]), round(float(values[t]), 4)] for t in fires]))
    return stats, contexts


def _token_texts(wrapper: ModelWrapper, ids: Sequence[int]) -> list[str]:
    return wrapper.tokenizer.batch_decode([[int(i)] for i in ids])


def logit_lens(wrapper: ModelWrapper, directions: torch.Tensor, k: int = LENS_TOKENS, batch: int = 256
               ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per direction the `k` tokens it promotes most and the `k` it suppresses most (logit lens)."""
    out = []
    for start in range(0, len(directions), batch):
        logits = wrapper.logit_lens(directions[start : start + batch]).cpu()
        high, low = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        for hv, hi, lv, li in zip(high.values, high.indices, low.values, low.indices):
            out.append((list(zip(_token_texts(wrapper, hi.tolist()), map(float, hv))),
                        list(zip(_token_texts(wrapper, li.tolist()), map(float, lv)))))
    return out


def refusal_directions(out: AnalysisLayout) -> tuple[dict[str, dict[str, np.ndarray]], str | None]:
    """{layer: {direction name: unit vector}} at the directions stage's chosen suffix position, and that
    position; empty without the stage."""
    record = out.directions.read(DirectionsResult)
    if record is None or not out.directions.vectors.is_file():
        return {}, None
    vectors = out.directions.read_vectors()
    position = record.selection.position
    j = PositionScheme(**record.scheme).node_classes.index(position) - 1  # after "content": the suffix positions
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, v in vectors.items():
        name, _, layer = key.rpartition(".")
        found.setdefault(layer, {})[name] = v[j] / max(float(np.linalg.norm(v[j])), 1e-12)
    return found, position


def check_inputs(record: DiscoveryRecord, circuits: Mapping[str, Sequence[tuple[Circuit, NodeScores]]],
                 saes: Mapping[str, SparseAutoencoder], cache: ActivationCache) -> list[str]:
    """The layers the circuits use; UserError naming what is missing or does not belong together."""
    layers = list(dict.fromkeys(n.layer for items in circuits.values() for c, _ in items for n in c.nodes))
    if not any(c.nodes for items in circuits.values() for c, _ in items):
        raise UserError("report: the analysis's circuits hold no node; nothing to explain (lower the discovery "
                        "threshold and run `analyze --stage discover`)")
    missing = [layer for layer in layers if layer not in saes]
    if missing:
        raise UserError(f"report: no SAE for layer(s) {missing} the circuits use; run `fit` to train them")
    uncached = [layer for layer in layers if layer not in cache.layers]
    if uncached:
        raise UserError(f"report: the activation cache {cache.dir} has no layer(s) {uncached}; the circuits come "
                        "from another cache: run `fit` with these layers")
    model = cache.model_name
    for layer in layers:
        meta, d_in = saes[layer].meta, saes[layer].cfg.d_in
        if d_in != cache.d_model:
            raise UserError(f"report: the SAE of {layer} takes d_in={d_in} but the cache holds d_model="
                            f"{cache.d_model}; SAEs and cache come from different models")
        if meta.model is not None and model is not None and meta.model != model:
            raise UserError(f"report: the SAE of {layer} was trained on model {meta.model!r}, the cache holds "
                            f"{model!r}; use the SAEs and cache of one run")
    if record.scheme.get("mode") not in ("positional", "global"):
        raise UserError("report: discovery.json has no position scheme; run `analyze --stage discover` again")
    return layers


def node_cards(circuits: Mapping[str, Sequence[tuple[Circuit, NodeScores]]], record: DiscoveryRecord,
               saes: Mapping[str, SparseAutoencoder], cache: ActivationCache, wrapper: ModelWrapper,
               shared_core: Mapping[str, Sequence[str]] | None = None,
               directions: Mapping[str, Mapping[str, np.ndarray]] | None = None,
               wanted: set[str] | None = None) -> dict[str, NodeCard]:
    """A card for every node of every circuit, or for the `wanted` ones (see the module docstring); one pass over
    the cache per layer."""
    layers = check_inputs(record, circuits, saes, cache)
    scheme = PositionScheme(**record.scheme)
    classes = scheme.node_classes
    tokens = token_table(cache, scheme)
    categories = list(cache.manifest["categories"])
    holders: dict[str, list[str]] = {}
    nodes = {}
    for method, items in circuits.items():
        for circuit, _ in items:
            for n in circuit.nodes:
                holders.setdefault(n.name, []).append(f"{method}/{circuit.name}")
                nodes.setdefault(n.name, n)
    cards: dict[str, NodeCard] = {}
    for layer in layers:
        sae = saes[layer].cpu().float()
        here = [n for n in nodes.values() if n.layer == layer and (wanted is None or n.name in wanted)]
        if not here:
            continue
        latents = np.array(sorted({n.feature for n in here if n.feature != ERROR}), np.int64)
        column = {f: i for i, f in enumerate(latents.tolist())}
        matrix, errors = encode_layer(cache, layer, sae, latents, any(n.feature == ERROR for n in here))
        decoder = sae.W_dec.detach()[torch.from_numpy(latents)].float()
        lens = dict(zip(latents.tolist(), logit_lens(wrapper, decoder))) if len(latents) else {}
        unit = torch.nn.functional.normalize(decoder, dim=-1).numpy()
        cosine = {name: unit @ v for name, v in (directions or {}).get(layer, {}).items()}
        for n in sorted(here, key=lambda n: (n.feature, n.position)):
            is_error = n.feature == ERROR
            values = errors if is_error else matrix[:, column[n.feature]].toarray().ravel()
            stats, contexts = node_statistics(values, tokens, classes.index(n.position), categories, is_error)
            scores = []
            for method, items in circuits.items():
                for circuit, s in items:
                    col = s.importance[layer].shape[1] - 1 if is_error else n.feature
                    p = s.positions.index(n.position)
                    scores.append(NodeScore(method, circuit.name, float(s.importance[layer][p, col]),
                                            None if s.signed is None else float(s.signed[layer][p, col]),
                                            f"{method}/{circuit.name}" in holders[n.name]))
            promoted, suppressed = ([], []) if is_error else lens[n.feature]
            cos = {} if is_error else {name: float(c[column[n.feature]]) for name, c in cosine.items()}
            cards[n.name] = NodeCard(n.name, layer, n.feature, n.position, holders[n.name],
                                     [m for m, core in (shared_core or {}).items() if n.name in core], scores, stats,
                                     contexts, promoted, suppressed, cos)
    return cards


def prompt_texts(cards: Mapping[str, NodeCard], samples: Sequence[tuple[PromptSample, Split]],
                 wrapper: ModelWrapper, cache: ActivationCache) -> dict[int, dict[str, Any]]:
    """The prompts the cards show: text, category, label, split and each token's text."""
    wanted = sorted({c.prompt for card in cards.values() for c in card.contexts})
    if len(samples) != cache.n_prompts:
        raise UserError(f"report: the run has {len(samples)} prompts but its activation cache {cache.dir} holds "
                        f"{cache.n_prompts}; the cache belongs to other prompts: run `fit` again")
    ids = wrapper.encode([samples[i][0].prompt for i in wanted]) if wanted else []
    out = {}
    for i, row in zip(wanted, ids):
        sample, split = samples[i]
        out[i] = {"category": sample.category, "label": LABELS[int(sample.refusal_label)], "split": split,
                  "tokens": _token_texts(wrapper, row)}
    return out


# --------------------------------------------------------------------------------------------------
# the page


def _image(path: Path) -> str | None:
    """A PNG as a data URI (inlined: the page works from the file system, alone)."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_tables(text: str) -> str:
    """HTML of `summary.md`: its pipe tables as tables, other lines as paragraphs (bold kept)."""
    parts, table = [], []

    def inline(s: str) -> str:
        s = html.escape(s.replace("\\|", "|"))
        while s.count("**") >= 2:
            s = s.replace("**", "<b>", 1).replace("**", "</b>", 1)
        return s

    def flush() -> None:
        if table:
            head, *body = [[inline(c.strip()) for c in row.strip().strip("|").split(" | ")]
                           for row in table if not set(row) <= set("|-: ")]
            parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(parts)


def _json_script(data: Any) -> str:
    """JSON safe inside a <script> element (no `</script>` or `<!--` can appear)."""
    return json.dumps(to_json(data), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def render_html(title: str, data: Mapping[str, Any]) -> str:
    """The whole page: the report's data as JSON, this package's script and style inlined."""
    assets = resources.files("refusal_sae")
    script = assets.joinpath("report.js").read_text(encoding="utf-8")
    style = assets.joinpath("report.css").read_text(encoding="utf-8")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head>\n<body>\n"
            f"<script type=\"application/json\" id=\"report-data\">{_json_script(data)}</script>\n"
            f"<script>{script}</script>\n</body></html>\n")


def ranked(circuit: Circuit) -> list[Node]:
    """The circuit's nodes, the most important first (ties by name): the order the size control cuts."""
    return sorted(circuit.nodes, key=lambda n: (-abs(n.importance), n.name))


def carded(circuit: Circuit) -> list[str]:
    """The nodes of `circuit` that get a card (`CARD_NODES`)."""
    return [n.name for n in ranked(circuit)[:CARD_NODES]]


def card_file_names(circuits: Mapping[str, Sequence[tuple[Circuit, NodeScores]]]) -> list[str]:
    """One card script per circuit, in the order of the methods and their circuits."""
    return [f"{i}.js" for i in range(sum(len(items) for items in circuits.values()))]


def _measurable(evaluation: Any) -> bool | None:
    """Whether F(M) - F(∅)'s interval lies above 0 (None: not evaluated)."""
    if evaluation is None:
        return None
    return evaluation.span.low is not None and evaluation.span.above_zero()


def default_size(circuit: Circuit, evaluation: Any) -> int:
    """The nodes a circuit opens with: its smallest size reaching faithfulness 0.8 where that is at most
    MAX_DEFAULT, else its top DEFAULT_NODES."""
    reach = None if evaluation is None else evaluation.reaches.get("0.8")
    size = reach if reach is not None and reach <= MAX_DEFAULT else DEFAULT_NODES
    return min(size, len(circuit.nodes))


def strongest_edges(circuit: Circuit, per_node: int = EDGES_PER_NODE) -> list[Edge]:
    """The edges among each node's `per_node` strongest (by |weight|), strongest first."""
    by_strength = sorted(circuit.edges, key=lambda e: (-abs(e.score), e.source, e.target))
    count: dict[str, int] = {}
    kept = []
    for e in by_strength:
        if count.get(e.source, 0) < per_node or count.get(e.target, 0) < per_node:
            kept.append(e)
            count[e.source] = count.get(e.source, 0) + 1
            count[e.target] = count.get(e.target, 0) + 1
    return kept


def node_label(card: NodeCard | None, prompts: Mapping[int, Mapping[str, Any]]) -> str:
    """A short label: the token where the node is largest in its top context, and the token its decoder promotes
    most ("kill → sorry"); "error" for an error node; "" without a card."""
    if card is None:
        return ""
    if card.feature == ERROR:
        return "error"
    def short(token: str) -> str:  # a whitespace token shows as its escape ("\\n")
        return token.strip()[:LABEL_CHARS] or repr(token)[1:-1][:LABEL_CHARS]

    fires = ""
    if card.contexts:
        top = card.contexts[0]
        position = int(max(top.values, key=lambda pv: pv[1])[0]) if top.values else None  # read back: a float
        tokens = prompts.get(top.prompt, {}).get("tokens", [])
        if position is not None and position < len(tokens):
            fires = short(tokens[position])
    promotes = short(card.promoted[0][0]) if card.promoted else ""
    return f"{fires} \u2192 {promotes}" if fires and promotes else fires or (f"\u2192 {promotes}" if promotes else "")


def card_scripts(circuits: Mapping[str, Sequence[tuple[Circuit, NodeScores]]], cards: Mapping[str, NodeCard],
                 prompts: Mapping[int, Mapping[str, Any]]) -> dict[str, str]:
    """{file name: script}: per circuit, its carded nodes' cards and the prompts they show, as one call of
    `CARDS_CALLBACK` (a script loads from the file system where a fetch of a JSON file would be refused)."""
    out = {}
    items = [c for group in circuits.values() for c, _ in group]
    for name, circuit in zip(card_file_names(circuits), items):
        mine = {n: cards[n] for n in carded(circuit) if n in cards}
        shown = {str(c.prompt): prompts[c.prompt] for card in mine.values() for c in card.contexts}
        out[name] = f"{CARDS_CALLBACK}({_json_script(name)},{_json_script({'cards': mine, 'prompts': shown})});\n"
    return out


def report_data(out: AnalysisLayout, run: RunLayout, record: DiscoveryRecord,
                circuits: Mapping[str, Sequence[tuple[Circuit, NodeScores]]], cards: Mapping[str, NodeCard],
                prompts: Mapping[int, Mapping[str, Any]], similarity: Mapping[str, Similarity],
                summary: Summary | None, directions_position: str | None,
                edits: Mapping[str, Sequence[CategoryEdits]] | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict."""
    edits = edits or {}
    methods = []
    files = iter(card_file_names(circuits))
    for method, items in circuits.items():
        layout = out.method(method)
        sim = similarity.get(method)
        evaluated = summary.methods[method].circuits if summary is not None and method in summary.methods else {}
        methods.append({
            "name": method,
            "circuits": [{"name": c.name, "category": c.category, "group": c.group, "threshold": c.threshold,
                          "n_prompts": c.n_prompts, "evaluation": evaluated.get(c.name),
                          "measurable": _measurable(evaluated.get(c.name)),
                          "default_size": default_size(c, evaluated.get(c.name)),
                          "cards_file": f"cards/{next(files)}",
                          "nodes": [{"name": n.name, "layer": n.layer, "position": n.position,
                                     "error": n.feature == ERROR, "importance": n.importance, "score": n.score,
                                     "card": n.name in cards, "label": node_label(cards.get(n.name), prompts)}
                                    for n in ranked(c)],
                          "n_edges": len(c.edges),
                          "edges": [[e.source, e.target, e.score] for e in strongest_edges(c)]} for c, _ in items],
            "curves": _image(layout.curves_png),
            "similarity_png": _image(layout.similarity_png),
            "verdict": sim.verdict.explanation if sim else None,
            "shared_core": sim.shared_core.nodes if sim else [],
            "answers": to_json(edits.get(method, [])),
        })
    directions = out.directions.read(DirectionsResult)
    tradeoff = out.read_tradeoff(TradeoffResult)
    validity = json.loads(run.validity.read_text(encoding="utf-8")) if run.validity.is_file() else None
    if validity is not None:
        validity.pop("prompts", None)
    return {
        "analysis": out.name, "run": str(run.root), "target": record.target, "scheme": record.scheme,
        "layers": list(dict.fromkeys(layer for items in circuits.values() for c, _ in items for layer in c.layers)),
        "classes": PositionScheme(**record.scheme).node_classes, "methods": methods, "card_nodes": CARD_NODES,
        "edges_per_node": EDGES_PER_NODE,
        "comparison": _image(out.comparison_png),
        "directions": None if directions is None else {
            "png": _image(out.directions.png), "verdict": directions.verdict.explanation,
            "layer": directions.selection.layer, "position": directions_position},
        "tradeoff": None if tradeoff is None else tradeoff_panel(out, tradeoff),
        "validity": validity,
        "summary_html": markdown_tables(out.summary_md.read_text(encoding="utf-8")) if out.summary_md.is_file() else None,
    }


def tradeoff_panel(out: AnalysisLayout, result: TradeoffResult) -> dict[str, Any]:
    """The trade-off's figure, its tables, and every held-out answer under each method's chosen edit beside the
    unedited one."""
    shown = [(UNEDITED, UNEDITED)] + [(c.method, c.setting) for c in result.chosen if c.setting]
    answers = [result.point(m, s).answers for m, s in shown]
    rows = [[result.prompt_categories[i], "toxic" if i < result.n_toxic else "hard", prompt, *(a[i] for a in answers)]
            for i, prompt in enumerate(result.prompts)]
    md = out.tradeoff_json.with_suffix(".md")
    return {"png": _image(out.tradeoff_png),
            "tables_html": markdown_tables(md.read_text(encoding="utf-8")) if md.is_file() else None,
            "columns": ["category", "prompt type", "prompt", *(m if m == UNEDITED else f"{m}: {s}" for m, s in shown)],
            "answers": rows}


@dataclass
class Report:
    """The report stage's output: the page, and the cards and prompts it shows (`load_cards` reads them back)."""

    page: str
    cards: dict[str, NodeCard]
    prompts: dict[int, dict[str, Any]]
    card_scripts: dict[str, str]
    """{file name in report/cards/: script} (`card_scripts`)."""


def build_report(out: AnalysisLayout, run: RunLayout, saes: Mapping[str, SparseAutoencoder], cache: ActivationCache,
                 splits: Mapping[Split, Sequence[PromptSample]], wrapper: ModelWrapper,
                 circuits: Mapping[str, Sequence[tuple[Circuit, NodeScores]]], record: DiscoveryRecord,
                 similarity: Mapping[str, Similarity], summary: Summary | None,
                 edits: Mapping[str, Sequence[CategoryEdits]] | None = None) -> Report:
    """Node cards and the page for the analysis `out` (its circuits, scores, similarity, evaluation figures,
    summary and refusal directions as written there, and the answers under each edit)."""
    directions, position = refusal_directions(out)
    core = {m: s.shared_core.nodes for m, s in similarity.items()}
    wanted = {n for items in circuits.values() for c, _ in items for n in carded(c)}
    cards = node_cards(circuits, record, saes, cache, wrapper, core, directions, wanted)
    samples = [(s, split) for split in SPLITS for s in splits.get(split, [])]  # the cache's prompt order
    prompts = prompt_texts(cards, samples, wrapper, cache)
    data = report_data(out, run, record, circuits, cards, prompts, similarity, summary, position, edits)
    return Report(render_html(f"refusal circuits: {out.name}", data), cards, prompts,
                  card_scripts(circuits, cards, prompts))


# --------------------------------------------------------------------------------------------------
# the cards outside the page: the W&B table, the notebook


def card_data(out: AnalysisLayout) -> dict[str, dict[str, Any]]:
    """The card scripts `build_report` wrote for `out`, read back as JSON: {"cards": {...}, "prompts": {...}}."""
    files = sorted(out.report_cards.glob("*.js"), key=lambda p: int(p.stem)) if out.report_cards.is_dir() else []
    if not files:
        raise UserError(f"{out.report_cards} holds no card scripts: this analysis has no report; run `python -m "
                        f"refusal_sae analyze --run_dir <run> --stage report --source {out.name}`")
    merged: dict[str, dict[str, Any]] = {"cards": {}, "prompts": {}}
    for path in files:
        text = path.read_text(encoding="utf-8")
        start = text.index(",") + 1  # after `refusalReportCards("<n>.js",`
        payload = json.loads(text[start : text.rindex(")")])
        merged["cards"].update(payload["cards"])
        merged["prompts"].update(payload["prompts"])
    return merged


def load_cards(out: AnalysisLayout) -> tuple[dict[str, NodeCard], dict[int, dict[str, Any]]]:
    """The node cards `build_report` wrote for `out`, typed again, and the prompts their contexts show."""
    data = card_data(out)
    return from_json(dict[str, NodeCard], data["cards"]), {int(k): v for k, v in data["prompts"].items()}


def _ascii_html(text: str) -> str:
    """Escaped, non-ASCII as character references: the fragment reads the same in whatever charset it is served."""
    return html.escape(text).encode("ascii", "xmlcharrefreplace").decode("ascii")


CONTEXT_STYLE = ("<style>.rs-ctx{border:1px solid #ddd;margin:5px 0;padding:4px}.rs-ctx .m{font-size:11px;color:#555}"
                 ".rs-ctx .k{font-family:monospace;font-size:12px}.rs-ctx .k span{display:inline-block;white-space:pre;"
                 "margin:1px 1px 1px 0}.rs-ctx .k .at{border-bottom:2px solid #2a6fdb}</style>")
"""report.css's look of a context, for `contexts_html`; its classes are under `rs-ctx` to touch nothing else in a
notebook page."""


def contexts_html(card: NodeCard, prompts: Mapping[int, Mapping[str, Any]], scheme: PositionScheme) -> str:
    """A card's top contexts as an HTML fragment with its own style (`CONTEXT_STYLE`), drawn as the page draws them
    (`contextBlock` in report.js) for places without report.css (a W&B table cell, a notebook): the prompt after
    the shared prefix, each token where the node fires shaded orange by its value over the context's peak (the
    value on hover), the node's position class underlined."""
    at = scheme.node_classes.index(card.position)
    blocks = []
    for c in card.contexts:
        prompt = prompts[c.prompt]
        values = {int(p): v for p, v in c.values}
        tokens = prompt["tokens"]
        spans = []
        for pos, (token, k) in enumerate(zip(tokens, scheme.classes(len(tokens)) - scheme.prefix)):
            if k < 0:  # the shared prefix: the same in every prompt, never a node
                continue
            attrs = ' class="at"' if k == at else ""
            if pos in values:
                shade = min(1.0, 0.15 + 0.85 * values[pos] / (c.peak or 1))
                attrs += (f' style="background:rgba(255,140,0,{shade:.2f})"'
                          f' title="{values[pos]:.3f} ({scheme.node_classes[k]})"')
            spans.append(f"<span{attrs}>{_ascii_html(token.replace(chr(10), '⏎'))}</span>")
        meta = (f"{prompt['category']} · {prompt['label']} · {prompt['split']} · peak {c.peak:.3f} · "
                f"prompt {c.prompt}")
        blocks.append(f'<div class="rs-ctx"><div class="m">{_ascii_html(meta)}</div>'
                      f'<div class="k">{"".join(spans)}</div></div>')
    return CONTEXT_STYLE + ("".join(blocks) or '<p style="color:#666">never fires at this position class</p>')


def _pooled(stats: Sequence[GroupStats], label: str) -> tuple[float | None, float | None]:
    """Density and mean over every category's `label` tokens (None: no such tokens; density None: an error node)."""
    here = [g for g in stats if g.label == label]
    n = sum(g.n_tokens for g in here)
    if not n:
        return None, None
    density = None if here[0].density is None else sum(g.density * g.n_tokens for g in here) / n
    return density, sum(g.mean * g.n_tokens for g in here) / n


def node_card_table(cards: Mapping[str, NodeCard], prompts: Mapping[int, Mapping[str, Any]], scheme: PositionScheme,
                    html_cell: Callable[[str], Any] = str) -> tuple[list[str], list[list[Any]]]:
    """The cards as one table, a row per node: what it is, the circuits holding it, its importance in every circuit
    (a column each, to sort by), its density and mean on toxic vs safe prompts of all categories, its logit lens
    and its top contexts (`contexts_html`, passed through `html_cell`: `wandb.Html` for a W&B table)."""
    circuits = list(dict.fromkeys(f"{s.method}/{s.circuit}" for card in cards.values() for s in card.scores))
    columns = ["node", "layer", "feature", "position", "circuits", "shared_core",
               *(f"importance/{c}" for c in circuits), "density_toxic", "mean_toxic", "density_safe", "mean_safe",
               "promoted", "suppressed", "top_contexts"]
    rows = []
    for card in cards.values():
        importance = {f"{s.method}/{s.circuit}": s.importance for s in card.scores}
        lens = [" ".join(json.dumps(t, ensure_ascii=False) for t, _ in tokens)
                for tokens in (card.promoted, card.suppressed)]
        rows.append([card.name, card.layer, card.feature, card.position, ", ".join(card.circuits),
                     ", ".join(card.shared_core), *(importance.get(c) for c in circuits),
                     *_pooled(card.stats, "toxic"), *_pooled(card.stats, "safe"), *lens,
                     html_cell(contexts_html(card, prompts, scheme))])
    return columns, rows


__all__ = ["Context", "GroupStats", "NodeCard", "NodeScore", "Report", "TokenTable", "build_report", "check_inputs",
           "card_data", "contexts_html", "encode_layer", "load_cards", "logit_lens", "markdown_tables", "node_card_table",
           "node_cards", "node_statistics", "prompt_texts", "refusal_directions", "render_html", "report_data",
           "token_table"]
