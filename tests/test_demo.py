"""demo.py: the page a person asks about two studies in, driven in a real (headless) Chromium: it answers as
predict.py answers, asks nothing of another host, names the box to change, and deletes the uploads when it
stops; and the heat map of where the model sees change."""

from __future__ import annotations

import json
import os
import socket
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import gradio as gr
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as shown
from selenium.webdriver.support.ui import WebDriverWait

from datamodules.dicom import read_study_file
from datamodules.mimic import load_images
from datamodules.pairs import make_pair
from datamodules.synthetic.dicoms import write_dicom
from models.config import FusionConfig, ModelConfig
from models.factory import build_model
from models.projector import TokenMerge
from run.change_map import DISPLAY_SIZE, ask_showing_change, token_heat
from run.demo import build_app, local_gradio, serve
from run.predict import Predictor

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_TIMEOUT_S = 60  # the longest wait for one step of the page (an upload shown, an answer generated)


@pytest.fixture(scope="module")
def predictor(trained_checkpoint) -> Predictor:
    return Predictor(trained_checkpoint, "cpu")


@pytest.fixture(scope="module")
def studies(world) -> tuple[Path, Path, int]:
    """Two frontal studies of one subject of the world's MIMIC-CXR-JPG tree: current, prior, and the days
    between them."""
    images = load_images(world / "mimic-cxr-jpg")
    frontal = images[images.view.isin(["PA", "AP"])].drop_duplicates("study_id")
    subject = frontal.groupby("subject_id").study_id.nunique().idxmax()
    visits = frontal[frontal.subject_id == subject].sort_values("study_datetime")
    prior, current = visits.iloc[0], visits.iloc[-1]
    return Path(current.path), Path(prior.path), (current.study_datetime - prior.study_datetime).days


# --- where the model sees change -----------------------------------------------------------------------------------


def test_a_changed_token_lights_its_own_block_of_the_image():
    magnitude = torch.tensor([0.0, 5.0, 0.0, 0.0])  # tokens row by row: (0, 0), (0, 1), (1, 0), (1, 1)
    heat = token_heat(magnitude, TokenMerge((4, 4), 2), 64)
    assert heat.shape == (64, 64)
    assert heat[16, 48] == 1  # the top-right quarter's middle
    assert heat[48, 16] == 0 and heat[16, 8] == 0


def test_a_token_over_the_merges_padding_covers_only_the_patches_it_has():
    # A 3 x 3 patch grid merged 2 x 2: token (1, 1) holds one real patch, the bottom-right one.
    heat = token_heat(torch.tensor([0.0, 0.0, 0.0, 1.0]), TokenMerge((3, 3), 2), 30)  # 10 px per patch
    assert heat[-1, -1] == 1
    assert heat[-1, 0] == 0 and heat[0, -1] == 0
    assert heat[12, 12] == 0  # the middle patch is token (0, 0)'s, however far token (1, 1)'s padding reaches


def test_the_change_map_overlays_the_current_image_and_the_answer_is_predicts(predictor, studies):
    current, prior, days = studies
    pair = make_pair("pair", read_study_file(current), read_study_file(prior), "difference", interval_days=days)
    answer, change = ask_showing_change(predictor, pair)
    assert answer.prediction == predictor.ask(pair).prediction
    assert change.size == (DISPLAY_SIZE, DISPLAY_SIZE) and change.mode == "RGB"


def test_there_is_no_change_map_without_a_prior(predictor, studies):
    pair = make_pair("pair", read_study_file(studies[0]), None, "abnormality")
    answer, change = ask_showing_change(predictor, pair)
    assert change is None and answer.prediction == predictor.ask(pair).prediction


def test_there_is_no_change_map_from_a_fusion_without_a_difference_branch(trained_checkpoint, tiny_base, studies):
    concat = Predictor(trained_checkpoint, "cpu")
    # The same base, so the collator's visual token counts fit; concat shows the prior's own tokens.
    concat.module.model = build_model(ModelConfig(base=str(tiny_base), fusion=FusionConfig(mode="concat")))
    current, prior, days = studies
    pair = make_pair("pair", read_study_file(current), read_study_file(prior), "difference", interval_days=days)
    answer, change = ask_showing_change(concat, pair)
    assert change is None and answer.prediction == concat.ask(pair).prediction


# --- the page, in a browser ----------------------------------------------------------------------------------------


@pytest.fixture
def browser():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        reason = f"{' and '.join(missing)} not installed: the page's test drives Debian's chromium and chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(predictor) -> gr.Blocks:
    """The demo served on a free port of 127.0.0.1 by this process, as ``demo.py`` serves it; its folder
    is the app's ``files``."""
    with local_gradio() as files:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        app = build_app(predictor)
        app.files = files
        serve(app, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
        try:
            yield app
        finally:
            app.close()
    assert not files.exists()


def upload(wait: WebDriverWait, role: str, file: Path) -> None:
    """``file`` given to the page as the ``role`` study, and shown."""
    wait.until(shown.presence_of_element_located((By.CSS_SELECTOR, f"#{role}-file input[type=file]"))).send_keys(
        str(file))
    wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, f"#{role}-image img")))
    wait.until(shown.text_to_be_present_in_element((By.CSS_SELECTOR, f"#{role}-date"), "Date:"))


def test_the_page_answers_two_uploaded_studies_as_predict_does_asking_nothing_of_other_hosts(
        browser, page, studies, trained_checkpoint, tmp_path):
    current, prior, days = studies
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
    browser.get(page.local_url)
    for role, file in (("current", current), ("prior", prior)):
        upload(wait, role, file)
        assert browser.find_element(By.CSS_SELECTOR, f"#{role}-date").text == "Date: no date"  # a JPEG has none
    browser.find_element(By.CSS_SELECTOR, "#preset input[role=combobox]").click()
    wait.until(shown.element_to_be_clickable((By.CSS_SELECTOR, "#preset [role=option][aria-label=difference]"))).click()
    browser.find_element(By.CSS_SELECTOR, "#interval-days textarea").send_keys(str(days))
    browser.find_element(By.CSS_SELECTOR, "#show-change input[type=checkbox]").click()
    browser.find_element(By.CSS_SELECTOR, "#ask").click()

    # The interval is shown with the answer, which may be empty (a tiny model's often is).
    interval = wait.until(
        lambda driver: driver.find_element(By.CSS_SELECTOR, "#interval textarea").get_property("value"))
    wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, "#change img")))
    browser.save_screenshot(str(tmp_path / "demo.png"))
    expected = Predictor(trained_checkpoint, "cpu").ask(
        make_pair("pair", read_study_file(current), read_study_file(prior), "difference", interval_days=days))
    assert browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value") == expected.prediction
    # The prompt too (the answer of a tiny model may be empty, and so equal whatever it was asked).
    browser.find_element(By.CSS_SELECTOR, "#prompt-details button").click()  # opened, as a person would
    prompt = wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, "#prompt textarea")))
    assert prompt.get_property("value") == expected.prompt
    assert interval == f"{days} days (interval_days as given)"
    status = browser.find_element(By.CSS_SELECTOR, "#status").text.strip()
    assert status == ("" if expected.prediction else "The model's answer is empty: it generated no text.")
    events = [json.loads(line["message"])["message"] for line in browser.get_log("performance")]
    hosts = {urlsplit(event["params"]["request"]["url"]).hostname for event in events
             if event["method"] == "Network.requestWillBeSent"}
    assert hosts - {None} == {"127.0.0.1"}  # None: data: and blob: URLs, made in the page


def test_the_page_shows_dicom_dates_and_asks_with_the_interval_between_them(browser, page, studies, predictor,
                                                                            tmp_path):
    current_jpeg, prior_jpeg, days = studies
    prior_date = date(2026, 1, 5)
    current_date = prior_date + timedelta(days=days)
    current = write_dicom(Image.open(current_jpeg), tmp_path / "current.dcm", study_date=f"{current_date:%Y%m%d}")
    prior = write_dicom(Image.open(prior_jpeg), tmp_path / "prior", study_date=f"{prior_date:%Y%m%d}")
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
    browser.get(page.local_url)
    for role, file, day in (("current", current, current_date), ("prior", prior, prior_date)):
        upload(wait, role, file)
        assert browser.find_element(By.CSS_SELECTOR, f"#{role}-date").text == f"Date: {day.isoformat()} (StudyDate)"
    browser.find_element(By.CSS_SELECTOR, "#ask").click()
    interval = wait.until(
        lambda driver: driver.find_element(By.CSS_SELECTOR, "#interval textarea").get_property("value"))
    assert interval == f"{days} days (StudyDate of both studies)"
    expected = predictor.ask(make_pair("pair", read_study_file(current), read_study_file(prior), "difference"))
    assert browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value") == expected.prediction


def test_the_page_says_which_box_to_change_when_a_question_cannot_be_asked(browser, page, studies):
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
    browser.get(page.local_url)
    upload(wait, "current", studies[0])
    browser.find_element(By.CSS_SELECTOR, "#ask").click()  # the difference preset, without a prior
    wait.until(shown.text_to_be_present_in_element((By.CSS_SELECTOR, "#status"), "give a prior study too"))
    assert browser.find_element(By.CSS_SELECTOR, "#status").text == \
        "Prior study: question=difference compares two studies: give a prior study too"
    assert browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value") == ""


def test_the_uploads_are_kept_in_the_demos_own_folder_and_deleted_when_it_stops(browser, page, studies):
    browser.get(page.local_url)
    upload(WebDriverWait(browser, PAGE_TIMEOUT_S), "current", studies[0])
    assert [path.name for path in page.files.rglob(studies[0].name)] == [studies[0].name]
    assert page.files.stat().st_mode & 0o777 == 0o700  # this user's alone
    page.close()
    assert not [path for path in page.files.rglob("*") if path.is_file()]
