"""utils.py: log files hold one message per line (progress bars included) and each library warning once."""
from __future__ import annotations

import io
import logging

from conftest import ROOT

from pipelines.quickstart import pipeline as quickstart_pipeline
from utils import progress_bar


def test_progress_bars_in_a_log_file_are_whole_lines():
    """tqdm redraws with carriage returns and ends its line only when it closes: a log line written meanwhile ran
    into the bar's text. Where the stream is not a terminal, each refresh is now a line of its own."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("papercut_test")
    log.addHandler(handler)
    try:
        bar = progress_bar(total=4, desc="distilling", file=stream, mininterval=0)
        for i in range(4):
            bar.update(1)
            log.warning("a log line %d", i)
        bar.close()
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [x for x in lines if x.startswith("a log line")] == [f"a log line {i}" for i in range(4)]
    assert all(x.startswith(("a log line", "distilling")) for x in lines), lines
    assert quickstart_pipeline.PROGRESS.findall(text.encode())[-1] == (b"4", b"4")  # the quickstart still reads it


def test_hub_and_datasets_warnings_print_once():
    import subprocess
    import sys

    code = ("import utils, datasets, huggingface_hub.utils.logging as hub\n"
            "hub.get_logger('huggingface_hub.x').warning('hub-said-this')\n"
            "datasets.utils.logging.get_logger('datasets.x').warning('datasets-said-this')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("hub-said-this") == 1 and proc.stderr.count("datasets-said-this") == 1, proc.stderr
