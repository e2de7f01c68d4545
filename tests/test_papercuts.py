"""Issue 21.7 and 21.8: what a newcomer met in the attack's runs. make_mapping.py writes the quickstart's alignment
from the extraction record; errors point to it; an extra tokenizer entry is named; short runs log enough points;
progress bars keep log files one message per line; the quickstart says how to continue after Ctrl-C or SIGTERM;
a pickled corpus says it carries no checksum."""
from __future__ import annotations

import io
import json
import logging
import signal

import pytest
from conftest import ROOT
from helpers import train_argv

import causal_train
import extract_distilbert
import make_mapping
import quickstart
from pipelines.quickstart import mlm as quickstart_mlm
from pipelines.quickstart import distill as quickstart_distill
from pipelines.quickstart import pipeline as quickstart_pipeline
from binarized_io import load_corpus
from input_checks import check_tokenizer
from neuron_mapping import ModelShape, load_neuron_mapping
from utils import CliError, progress_bar


# --- make_mapping.py --alignment extracted -------------------------------------------------------------------

@pytest.mark.parametrize("output", ["student.pth", "student_folder"])
def test_make_mapping_writes_the_quickstarts_alignment_from_the_extraction_record(distill_setup, tmp_path, output):
    student = tmp_path / output
    extract_distilbert.main(["--model_name", str(distill_setup["teacher"]), "--dump_checkpoint", str(student),
                             "--layers", "1,3", "--vocab_transform"])
    record = json.loads((student / "extraction.json" if student.is_dir() else tmp_path / "student.pth.json").read_text())
    assert record["teacher_layers"] == [1, 3]
    out = tmp_path / "extracted.nm"
    make_mapping.main(["--teacher", str(distill_setup["teacher"]), "--student", str(student), "--alignment", "extracted",
                       "--output", str(out)])
    heads, hidden = 4, 32  # the distill set-up's width
    assert json.loads(out.read_text()) == quickstart_distill.neuron_mapping([1, 3], heads, hidden // heads)
    # and it is a mapping causal_train.py takes for this teacher and student
    causal_train.main(train_argv(distill_setup, tmp_path / "run", "--max_steps", "1", "--neuron_mapping", str(out),
                                 "--student_config", str(student if student.is_dir() else tmp_path / "student.config.json"),
                                 "--student_pretrained_weights", str(student)))


def test_make_mapping_extracted_needs_the_record(distill_setup, tmp_path):
    with pytest.raises(CliError, match="--alignment extracted needs the extraction record of --student .*student.json"):
        make_mapping.main(["--teacher", str(distill_setup["teacher"]), "--student", str(distill_setup["student_config"]),
                           "--alignment", "extracted", "--output", str(tmp_path / "m.nm")])
    assert not (tmp_path / "m.nm").exists()


def test_a_shipped_mapping_that_does_not_fit_points_to_make_mapping():
    with pytest.raises(CliError) as err:
        load_neuron_mapping(ROOT / "training_configs" / "single_middle_layer_6.nm", ModelShape(4, 32, 4),
                            ModelShape(2, 32, 4))
    assert "single_middle_layer_6.nm, entry 0, teacher variable" in str(err.value)
    assert "write one for these models with scripts/make_mapping.py" in str(err.value)


# --- a tokenizer one entry larger than the model -----------------------------------------------------------

def test_an_extra_tokenizer_entry_is_named(tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok))
    tok.add_tokens(["<|im_extra|>"])
    with pytest.raises(CliError) as err:
        check_tokenizer(tok, config, tokenizer_flag="--tokenizer_name", tokenizer_name="tok", model_name="the teacher")
    assert f"the entry beyond it: id {len(tok) - 1} '<|im_extra|>' (an added token)" in str(err.value)


# --- logging and progress bars -------------------------------------------------------------------------------

def test_a_short_run_logs_about_fifty_points_by_default(distill_setup, tmp_path, caplog):
    """--log_interval 500 by default gave one point (the final one) in a short run."""
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "6")
    i = argv.index("--log_interval")
    del argv[i:i + 2]
    caplog.set_level(logging.INFO)
    causal_train.main(argv)
    steps = [r.getMessage().split(" |")[0] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == [f"step {n}" for n in range(1, 7)]
    assert "logging every 1" in caplog.text


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


# --- the quickstart on Ctrl-C and SIGTERM; its report module's --help ------------------------------------------

@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_the_quickstart_says_how_to_continue_when_stopped(tmp_path, monkeypatch, caplog, how):
    import os

    def stopped(self):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    class Unhandled(Exception):
        pass

    def guard(signum, frame):  # what the test sees if the quickstart did not take SIGTERM itself
        raise Unhandled

    monkeypatch.setattr(quickstart_mlm.MlmQuickstart, "run", stopped)
    before = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(SystemExit) as stop:
            quickstart.main(["--out", str(tmp_path / "q"), "--preset", "test"])
        assert signal.getsignal(signal.SIGTERM) == guard  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, before)
    signum = signal.SIGINT if how == "ctrl-c" else signal.SIGTERM
    assert stop.value.code == 128 + signum
    assert (f"stopped by {signal.Signals(signum).name}: run the same command again to continue (finished stages are "
            f"skipped") in caplog.text


# --- 7. a pickled corpus carries no checksum -------------------------------------------------------------------

def test_a_pickled_corpus_says_it_has_no_checksum(tmp_path, caplog):
    import pickle

    import numpy as np

    path = tmp_path / "c.pickle"
    path.write_bytes(pickle.dumps([np.arange(2, 20, dtype=np.uint16)]))
    load_corpus(path)
    assert f"{path}: a pickled corpus carries no checksum: a flipped bit or a damaged copy is read without a word; " \
           f"the .bin format" in caplog.text
