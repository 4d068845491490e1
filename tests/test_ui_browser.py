"""The /ui page in real headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium):
load it, generate, click a thumbs button, and read the vote back from Kafka. Keeps a screenshot in
test-artifacts/ (gitignored)."""

import hashlib
import shutil
import time
from pathlib import Path

import pytest
from kafka_fixtures import read_topic

from alignloop.events import hash_user_id, parse_event

pytestmark = pytest.mark.kafka

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_vote_from_the_page_reaches_kafka(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    user = "browser-user-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:8]
    # 1. Load the page (the /ui -> /ui/ redirect included)
    browser.get(served.url + "/ui")
    WebDriverWait(browser, 30).until(EC.element_to_be_clickable((By.ID, "generate")))
    for field, value in (("prompt", "two blue squares on a white background"), ("n", "4"), ("k", "2"),
                         ("steps", "2"), ("seed", "77"), ("user-id", user)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)

    # 2. Generate: progress shows, then k cards with rewards
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "progress").is_displayed()
                                     or d.find_elements(By.CSS_SELECTOR, ".card"))
    cards = WebDriverWait(browser, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card") or None)
    assert len(cards) == 2
    assert not browser.find_element(By.ID, "progress").is_displayed()
    assert [c.get_attribute("data-rank") for c in cards] == ["1", "2"]
    assert all("reward" in c.find_element(By.CSS_SELECTOR, ".reward").text for c in cards)
    assert browser.execute_script("return document.querySelector('.card img').naturalWidth") == 32

    # 3. Thumbs up on the best image: the state shows the vote
    image_id = cards[0].get_attribute("data-image-id")
    cards[0].find_element(By.CSS_SELECTOR, "button.up").click()
    state = cards[0].find_element(By.CSS_SELECTOR, ".vote-state")
    WebDriverWait(browser, 30).until(lambda d: state.get_attribute("data-state") in ("voted-up", "failed"))
    assert state.get_attribute("data-state") == "voted-up", state.text
    assert cards[0].find_element(By.CSS_SELECTOR, "button.up").get_attribute("aria-pressed") == "true"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-vote.png"))

    # 4. The vote is on the feedback topic, with the hashed user id
    user_hash = hash_user_id(user, served.user_hash_key)
    deadline = time.monotonic() + 30
    while True:
        votes = [e for e in (parse_event(r.value) for r in read_topic(served.bootstrap, served.topics.feedback))
                 if e.image_id == image_id]
        if votes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(v.vote, v.user_hash) for v in votes] == [("up", user_hash)]
