"""The analysis report: node cards on the planted model, and the page as a person sees it in headless Chromium."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from refusal_sae.analysis import AnalysisConfig, AnalysisInputs, load_discovery, run_analysis
from refusal_sae.circuits import ERROR, Circuit, Node
from refusal_sae.directions import DirectionsConfig
from refusal_sae.editing import CategoryEdits, EditingConfig
from refusal_sae.errors import UserError
from refusal_sae.evaluation import EvaluationConfig
from refusal_sae.layout import RunLayout
from refusal_sae.positions import PositionScheme
from refusal_sae.report import (
    CARD_NODES,
    card_data,
    load_cards,
    node_card_table,
    node_cards,
    node_label,
    render_html,
)
from refusal_sae.sae import SAEMeta
from refusal_sae.similarity import SimilarityConfig
from refusal_sae.validity import ValidityConfig
from tests.conftest import open_page, single_thread
from tests.planted import LAYERS, METRIC, PLANTED, REFUSAL_WORD, exact_saes, vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = AnalysisConfig(evaluation=EvaluationConfig(n_sizes=4, fractions=[0.1], random_circuits=2, bootstrap=100),
                     similarity=SimilarityConfig(permutations=20), metric=METRIC, validity_report=False,
                     directions=DirectionsConfig(enabled=True, bootstrap=100),
                     editing=EditingConfig(enabled=True, max_new_tokens=2, random_circuits=1, strengths=[0.0],
                                           bootstrap=100))


@pytest.fixture(scope="module")
def analysed(planted, tmp_path_factory: pytest.TempPathFactory):
    """Every stage, the report included, on the planted model (conftest's `planted`): (inputs, the analysis)."""
    wrapper, splits, saes, _, cache = planted
    run = RunLayout(tmp_path_factory.mktemp("report"))
    inputs = AnalysisInputs(saes, cache, splits, lambda: wrapper, run, ValidityConfig(max_new_tokens=2))
    out = run.analysis("a")
    with single_thread():
        run_analysis(inputs, out, CFG)
    return inputs, out


def cards_of(out) -> tuple[dict, dict]:
    data = card_data(out)
    return data["cards"], data["prompts"]


@pytest.mark.slow
def test_planted_latents_show_their_trigger_words_and_promote_the_refusal_token(analysed) -> None:
    _, out = analysed
    cards, prompts = cards_of(out)
    triggers = set(vocabulary()[0])
    circuits = [c for c, _ in load_discovery(out).circuits["correlation"]]
    assert set(cards) == set().union(*(c.node_names() for c in circuits))  # a card for every node, no other
    assert all(len(c.nodes) <= CARD_NODES for c in circuits)  # (small circuits: every node is carded)
    for layer in LAYERS:
        for j in PLANTED:
            card = cards[f"{layer}/{j}@content"]
            assert card["contexts"], card["name"]
            for context in card["contexts"]:
                prompt = prompts[str(context["prompt"])]
                position, value = max(context["values"], key=lambda pv: pv[1])
                assert prompt["label"] == "toxic" and prompt["tokens"][position] in triggers
                assert value == pytest.approx(context["peak"], abs=1e-3)
            by_label = {(s["category"], s["label"]): s for s in card["stats"]}
            for category in ("alpha", "beta"):  # safe prompts hold no trigger: the latent never fires on them
                assert by_label[category, "safe"]["density"] == 0 and by_label[category, "toxic"]["density"] > 0.3
            assert card["promoted"][0][0] == REFUSAL_WORD and card["promoted"][0][1] > 0  # the head reads it
            assert sorted(card["circuits"]) == ["correlation/alpha", "correlation/beta"]
            assert card["shared_core"] == ["correlation"]
            alpha = next(s for s in card["scores"] if s["circuit"] == "alpha")
            assert alpha["in_circuit"] and alpha["importance"] >= 0.5 and alpha["score"] > 0
            last = cards[f"{layer}/{j}@-1"]  # the suffix node's top prompts are toxic ones too
            assert {prompts[str(c["prompt"])]["label"] for c in last["contexts"]} == {"toxic"}
            # the refusal direction (toxic minus safe mean) is the planted sum b_0 + b_1 + b_2: cosine 1/sqrt(3)
            # (each category's too: both draw their triggers from every planted word)
            assert set(card["cosines"]) == {"global", "alpha", "beta"}
            assert all(v == pytest.approx(3 ** -0.5, abs=0.15) for v in card["cosines"].values())


@pytest.mark.slow
def test_an_error_node_card_gives_its_norm_where_the_sae_misses(analysed) -> None:
    """The exact SAE leaves no error; one whose decoder lost planted latent 0 misses it on the trigger tokens."""
    inputs, out = analysed
    discovery = load_discovery(out)
    scores = discovery.circuits["correlation"][0][1]
    circuit = Circuit("alpha", "all", "correlation", LAYERS, [Node("residuals_0", ERROR, "content", 1.0, 0.5)])
    items = {"correlation": [(circuit, scores)]}
    exact = node_cards(items, discovery.record, inputs.saes, inputs.cache, inputs.wrapper())
    assert all(s.density is None and s.mean < 1e-4 for s in exact["residuals_0/error@content"].stats)
    lossy = exact_saes()
    with torch.no_grad():
        lossy["residuals_0"].W_dec[PLANTED[0]] = 0
    card = node_cards(items, discovery.record, lossy, inputs.cache, inputs.wrapper())["residuals_0/error@content"]
    mean = {(s.category, s.label): s.mean for s in card.stats}
    assert mean["alpha", "toxic"] > 0.2 and mean["alpha", "safe"] < 1e-4
    assert not card.promoted and not card.cosines


@pytest.mark.slow
def test_the_card_table_has_a_row_per_node_and_highlights_the_trigger_words(analysed) -> None:
    """What the W&B table `circuits/node_cards` and the notebook show, read back from cards.json: a planted latent's
    row holds its importance, its toxic-only density and the refusal word first in its lens, and in each of its top
    contexts the strongest-shaded token is a trigger word at the node's class (underlined), the prefix left out."""
    inputs, out = analysed
    cards, prompts = load_cards(out)
    scheme = PositionScheme(**load_discovery(out).record.scheme)
    columns, rows = node_card_table(cards, prompts, scheme)
    assert [r[0] for r in rows] == list(cards) and len({len(r) for r in rows} | {len(columns)}) == 1
    name = f"{LAYERS[0]}/{PLANTED[0]}@content"
    row = dict(zip(columns, rows[list(cards).index(name)]))
    assert row["importance/correlation/alpha"] >= 0.5 and "correlation/alpha" in row["circuits"]
    assert row["density_safe"] == 0 and row["density_toxic"] > 0.3 and row["mean_toxic"] > 0
    assert row["promoted"].startswith(json.dumps(REFUSAL_WORD))
    page = row["top_contexts"]
    assert page.isascii()  # non-ASCII as character references: the same in any charset
    spans = re.findall(r"<span([^>]*)>([^<]*)</span>", page)
    contexts = cards[name].contexts
    assert len(spans) == sum(len(prompts[c.prompt]["tokens"]) - scheme.prefix for c in contexts)
    strongest = [(attrs, token) for attrs, token in spans if "rgba(255,140,0,1.00)" in attrs]
    assert len(strongest) >= len(contexts) and {token for _, token in strongest} <= set(vocabulary()[0])
    assert all('class="at"' in attrs for attrs, _ in strongest)
    with pytest.raises(UserError, match=r"has no report; run .*--stage report --source nowhere"):
        load_cards(inputs.run.analysis("nowhere"))


@pytest.mark.slow
def test_missing_or_mismatched_inputs_are_one_line_naming_the_fix(analysed, tmp_path: Path) -> None:
    inputs, out = analysed
    discovery = load_discovery(out)
    one_layer = {"residuals_0": inputs.saes["residuals_0"]}
    with pytest.raises(UserError, match=r"no SAE for layer\(s\) \['residuals_1'\].*run `fit`"):
        node_cards(discovery.circuits, discovery.record, one_layer, inputs.cache, inputs.wrapper())
    other = exact_saes()
    other["residuals_0"].meta = SAEMeta(layer="residuals_0", model="someone/else")
    with pytest.raises(UserError, match="trained on model 'someone/else', the cache holds"):
        node_cards(discovery.circuits, discovery.record, other, inputs.cache, inputs.wrapper())
    run = RunLayout(tmp_path)
    with pytest.raises(UserError, match="run the discover stage first"):
        run_analysis(inputs, run.analysis("b"), CFG, ["report", "summary"], source=run.analysis("nowhere"))


@pytest.mark.slow
def test_the_report_stage_alone_builds_the_page_from_another_analysis(analysed) -> None:
    inputs, out = analysed
    again = inputs.run.analysis("report_only")
    run_analysis(inputs, again, CFG, ["report", "summary"], source=out)
    page = again.report_html.read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "residuals_0/0@content" in page
    assert again.method("correlation").curves_png.is_file()  # the source's evaluation, drawn here
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page  # no network


# ------------------------------------------------------------------ in a real browser


def not_blank(png: bytes) -> bool:
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")[..., :3]
    return pixels.std() > 0.05 and (pixels.mean(-1) < 0.5).mean() > 0.001  # varied, with dark ink somewhere


@pytest.mark.slow
def test_the_report_renders_every_node_and_opens_a_card(analysed, browser) -> None:
    from selenium.webdriver.common.by import By

    _, out = analysed
    open_page(browser, out.report_html)
    assert not_blank(browser.get_screenshot_as_png())
    evaluated = out.read_summary().methods["correlation"].circuits
    for circuit, _ in load_discovery(out).circuits["correlation"]:
        drawn = browser.find_elements(By.CSS_SELECTOR, f'svg[data-circuit="correlation/{circuit.name}"] circle.node')
        labels = browser.find_elements(By.CSS_SELECTOR, f'svg[data-circuit="correlation/{circuit.name}"] text.label')
        reach = evaluated[circuit.name].reaches["0.8"]  # opens at its faithful size, else its top 30
        assert len(drawn) == min(reach if reach is not None and reach <= 50 else 30, len(circuit.nodes)) > 0
        assert len(labels) == len(drawn) and all(t.get_attribute("textContent").strip() for t in labels)
    first = load_discovery(out).circuits["correlation"][0][0].name  # the pane open at first: labels visible
    shown = browser.find_elements(By.CSS_SELECTOR, f'svg[data-circuit="correlation/{first}"] text.label')
    assert all(t.is_displayed() and t.text.strip() for t in shown)
    name = f"{LAYERS[0]}/{PLANTED[0]}@content"
    browser.find_element(By.CSS_SELECTOR, f'svg[data-circuit="correlation/alpha"] circle[data-node="{name}"]').click()
    card = browser.find_element(By.ID, "card")
    assert card.get_attribute("data-node") == name
    cards, prompts = cards_of(out)
    contexts = card.find_elements(By.CSS_SELECTOR, ".context")
    assert len(contexts) == len(cards[name]["contexts"])
    top = cards[name]["contexts"][0]
    position, _ = max(top["values"], key=lambda pv: pv[1])
    word = prompts[str(top["prompt"])]["tokens"][position]
    fired = contexts[0].find_elements(By.CSS_SELECTOR, ".tok[title]")  # the highlighted tokens of the top context
    assert word in [t.text for t in fired] and word in set(vocabulary()[0])
    assert REFUSAL_WORD in card.text and "Top contexts" in card.text


@pytest.mark.slow
def test_the_report_shows_each_edits_answers_beside_the_unedited_ones(analysed, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, out = analysed
    open_page(browser, out.report_html)
    record = out.method("correlation").read_edits(CategoryEdits, "alpha")
    block = browser.find_element(By.CSS_SELECTOR, 'section[data-method="correlation"] details[data-category="alpha"]')
    block.find_element(By.TAG_NAME, "summary").click()
    rows = block.find_elements(By.CSS_SELECTOR, "table")[0].find_elements(By.TAG_NAME, "tr")[1:]
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [o.edit for o in record.outcomes]
    last = len(record.outcomes) - 1
    Select(block.find_element(By.TAG_NAME, "select")).select_by_value(str(last))
    answers = block.find_elements(By.CSS_SELECTOR, "table")[1].find_elements(By.TAG_NAME, "tr")
    assert [c.text for c in answers[0].find_elements(By.TAG_NAME, "th")][2:] == ["model", record.outcomes[last].edit]
    shown = [[c.get_attribute("textContent") for c in r.find_elements(By.TAG_NAME, "td")] for r in answers[1:]]
    assert [s[0] for s in shown] == record.prompts
    assert [s[2] for s in shown] == record.outcome("model").answers
    assert [s[3] for s in shown] == record.outcomes[last].answers


@pytest.mark.slow
def test_a_circuit_of_500_nodes_renders_and_responds(analysed, browser, tmp_path: Path) -> None:
    """The planted run's page data with one circuit grown to 500 nodes (each with a card in its circuit's script):
    it opens at its default size, draws all 500 when asked, and a click loads the card."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, out = analysed
    page = out.report_html.read_text(encoding="utf-8")
    start = page.index('id="report-data">') + len('id="report-data">')
    data = json.loads(page[start : page.index("</script>", start)])
    circuit = data["methods"][0]["circuits"][0]
    template = circuit["nodes"][0]
    cards = card_data(out)
    nodes, mine = [], {}
    for i in range(500):
        layer, position = LAYERS[i % 2], data["classes"][i % len(data["classes"])]
        name = f"{layer}/{1000 + i}@{position}"
        nodes.append({**template, "name": name, "layer": layer, "position": position, "importance": 1 - i / 1000})
        mine[name] = {**cards["cards"][template["name"]], "name": name, "position": position}
    circuit["nodes"] = nodes
    circuit["edges"] = [[a["name"], b["name"], 0.5] for a, b in zip(nodes[::2], nodes[1::2])]
    circuit["cards_file"] = "cards/big.js"
    path = tmp_path / "big.html"
    path.write_text(render_html("500 nodes", data), encoding="utf-8")
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "big.js").write_text(
        f"refusalReportCards('big.js', {json.dumps({'cards': mine, 'prompts': cards['prompts']})});")
    open_page(browser, path)
    svg = f'svg[data-circuit="correlation/{circuit["name"]}"]'
    assert len(browser.find_elements(By.CSS_SELECTOR, f"{svg} circle.node")) == circuit["default_size"] <= 50
    Select(browser.find_element(By.CSS_SELECTOR, f'select[data-circuit="correlation/{circuit["name"]}"]')
           ).select_by_value("500")
    drawn = browser.find_elements(By.CSS_SELECTOR, f"{svg} circle.node")
    assert len(drawn) == 500
    drawn[-1].click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "card").get_attribute("data-node") == nodes[-1]["name"])
    assert "Top contexts" in browser.find_element(By.ID, "card").text  # its card, loaded from the circuit's script
    assert not_blank(browser.get_screenshot_as_png())


def test_markdown_tables_escape_what_they_show() -> None:
    from refusal_sae.report import markdown_tables

    page = markdown_tables("**m** (x)\n\n| a | b |\n|---|---|\n| <script> | 1 \\| 2 |\n")
    assert "<b>m</b>" in page and "&lt;script&gt;" in page and "<td>1 | 2</td>" in page


CIRCUIT_TRACER_FIELDS = {
    "metadata": {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
                 "node_threshold": (float, type(None)), "schema_version": int},
    "qParams": {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str},
    "node": {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
             "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
             "influence": (float, type(None)), "activation": (float, type(None))},
}
"""The fields and types of circuit-tracer's graph models (its `frontend/graph_models.py`: Metadata, QParams, Node;
links are source, target, weight), which `refusal_sae.export` writes."""


@pytest.mark.slow
def test_every_circuit_is_exported_as_a_circuit_tracer_graph(analysed) -> None:
    _, out = analysed
    discovery = load_discovery(out)
    cards, prompts = load_cards(out)
    for method, circuits in discovery.circuits.items():
        for circuit, _ in circuits:
            doc = json.loads(out.method(method).export_path(circuit.name).read_text(encoding="utf-8"))
            assert set(doc) == {"metadata", "qParams", "nodes", "links"}
            for part, fields in (("metadata", doc["metadata"]), ("qParams", doc["qParams"]),
                                 *(("node", n) for n in doc["nodes"])):
                assert set(fields) == set(CIRCUIT_TRACER_FIELDS[part]), part
                for key, kind in CIRCUIT_TRACER_FIELDS[part].items():
                    assert isinstance(fields[key], kind), (part, key, fields[key])
            nodes = {n["node_id"]: n for n in doc["nodes"]}
            assert len(nodes) == len(circuit.nodes) + 1  # one per circuit node, and the target F
            (target,) = [n for n in doc["nodes"] if n["is_target_logit"]]
            assert doc["metadata"]["prompt_tokens"] == discovery.means.scheme.node_classes
            assert target["ctx_idx"] == len(doc["metadata"]["prompt_tokens"]) - 1
            assert all({"source", "target", "weight"} == set(link) and link["source"] in nodes
                       and link["target"] in nodes for link in doc["links"])
            to_target = {link["source"]: link["weight"] for link in doc["links"] if link["target"] == target["node_id"]}
            by_name = {n.name: n for n in circuit.nodes}
            for exported, node in zip(doc["nodes"], circuit.nodes):  # the circuit's nodes in its order, then F
                assert exported["influence"] == pytest.approx(node.importance)
                assert to_target[exported["node_id"]] == pytest.approx(node.score)
                assert doc["metadata"]["prompt_tokens"][exported["ctx_idx"]] == node.position
                assert exported["layer"] == node.layer.removeprefix("residuals_")
                assert exported["feature_type"] == ("sae error" if node.feature == ERROR else "sae latent")
                label = node_label(cards[node.name], prompts) if node.name in cards else ""
                assert exported["clerp"] == (label or node.name)  # the report's label, else the node's name
            assert len(to_target) == len(by_name)
    planted = [n for c, _ in discovery.circuits["correlation"] for n in c.nodes if n.feature in PLANTED]
    assert planted  # the planted latents are in the exported circuits (checked node by node above)
