"""The web page that asks a trained model about a person's own pair of studies (what ``python demo.py``
serves): ``run.predict.Predictor`` behind a Gradio page, on this machine only.

The page reads the two uploaded files as ``predict.py`` does (``datamodules.dicom``), shows them side by
side with their dates, and asks the question with ``datamodules.pairs.make_pair``, so the model is
prompted as ``predict.py`` and ``eval.py`` prompt it. A mistake a person can fix (an unreadable file, a
missing date, a preset without its finding) is a message in the page, naming the box to change.

Nothing leaves the machine: the server listens on ``host`` (127.0.0.1 unless set otherwise), with no
share link and Gradio's analytics off. Gradio keeps the uploads, and the images it serves, in a folder of
this run's own (``local_gradio``: readable by this user alone), from which they are deleted about fifteen
minutes after upload and, with the folder, when the demo stops; a demo killed outright (SIGKILL) leaves
the folder behind in the system's temporary directory.
"""

from __future__ import annotations

import html
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
from omegaconf import DictConfig

from common.readers import InputError
from datamodules.dicom import StudyFile, read_study_file
from datamodules.pairs import make_pair, parse_days
from datamodules.presets import PRESETS, AskError
from datamodules.prognostic_builder import MAX_DAYS
from run.change_map import ask_showing_change
from run.evaluate import require_checkpoint
from run.predict import Predictor

FREE_QUESTION = "free question"
# Every five minutes Gradio deletes the files this page received or made more than fifteen minutes before.
DELETE_CACHE = (300, 900)
# The boxes of the page by the names make_pair's errors use for the settings to change.
BOX_LABELS = {
    "prior": "Prior study", "current_date": "Current study's date", "prior_date": "Prior study's date",
    "interval_days": "Days between the studies", "question": "Question", "days": "Days ahead",
    "finding": "Finding", "options": "Choices",
}
# Gradio's image "share" button posts the image to a Hugging Face discussion: left out.
IMAGE_BUTTONS = ["download", "fullscreen"]
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def footer(host: str) -> str:
    """What the page tells a person about where their files go."""
    where = ("Nothing leaves this machine: the page is served to it alone" if host in LOOPBACK_NAMES else
             f"The page is served on {host}, where other machines can reach it")
    return (f"{where}, with no share link and no analytics. Uploaded files are kept only in this demo's own "
            "temporary folder, deleted about fifteen minutes after upload and when the demo stops; no question, "
            "answer or file is stored or logged.")


def date_label(study: StudyFile) -> str:
    """The study's date and the tag it came from, e.g. ``2026-01-05 (StudyDate)``, or ``no date``."""
    return f"{study.date.isoformat()} ({study.date_source})" if study.date is not None else "no date"


def uploaded(file: dict | None) -> str | None:
    """An upload's path in Gradio's cache. The page's events take their inputs unprocessed
    (``preprocess=False``), an upload as the file data Gradio checked is in its cache: gr.File's own
    processing leaves an empty temporary file there, and an open handle, on every event (gradio 6.31)."""
    return None if file is None else file["path"]


def show_study(file: dict | None) -> tuple:
    """An upload shown: its image, its date, and what is wrong with it if it cannot be read."""
    if uploaded(file) is None:
        return None, "", ""
    try:
        study = read_study_file(uploaded(file))
    except InputError as error:
        return None, "", f"**Cannot read this file.** {_shown(error)}"
    return study.image, f"Date: {date_label(study)}", ""


def question_boxes(preset: str) -> tuple:
    """The boxes the chosen question needs, shown; the others hidden."""
    free = preset == FREE_QUESTION
    needs_finding = not free and PRESETS[preset].needs_finding
    return (gr.Textbox(visible=free), gr.Textbox(visible=needs_finding), gr.Textbox(visible=preset == "prognosis"),
            gr.Textbox(visible=free))


def _given(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


def _shown(error: Exception) -> str:
    """An error's message as Markdown shows it: its ``<placeholders>`` (and the file names) as text, not HTML."""
    return html.escape(str(error))


def settings_text(settings: dict) -> str:
    return "\n".join(f"- `{key}`: {value}" for key, value in settings.items())


@contextmanager
def local_gradio() -> Iterator[Path]:
    """Gradio kept to this run while the page is built and served: its analytics off, and its uploads
    and served images in a new folder readable by this user alone (``tempfile.mkdtemp``'s mode 0700),
    removed on leaving; Gradio's own deprecation warnings from pandas (noise about Gradio's code, on
    every question) silenced."""
    names = ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED")  # Gradio's telemetry reads the latter itself
    before = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="lumen-demo-") as folder, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"gradio\.queueing")
        os.environ.update(GRADIO_TEMP_DIR=folder, GRADIO_ANALYTICS_ENABLED="False")
        try:
            yield Path(folder)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def build_app(predictor: Predictor, host: str = "127.0.0.1", allow_different_patients: bool = False) -> gr.Blocks:
    """The page, asking ``predictor`` (loaded once, shared by every visitor's questions); built and
    served within ``local_gradio``."""

    def ask(current_file, prior_file, current_date, prior_date, interval_days, preset, question, finding, days,
            options, show_change):
        blank = ("", "", "", "", gr.Image(None, visible=False))  # a previous answer cleared
        current_file, prior_file = uploaded(current_file), uploaded(prior_file)
        if current_file is None:
            return "**Upload the current study** (a DICOM, JPEG or PNG file).", *blank
        try:
            current = read_study_file(current_file)
            prior = read_study_file(prior_file) if prior_file is not None else None
            free = preset == FREE_QUESTION
            # The days are text boxes: Gradio's number box sends 0 when empty.
            pair = make_pair("demo", current, prior, question if free else preset,
                             days=parse_days(days, "days", whole=True),
                             finding=_given(finding), options=options.split("|") if free and _given(options) else None,
                             current_date=_given(current_date), prior_date=_given(prior_date),
                             interval_days=parse_days(interval_days, "interval_days"),
                             allow_different_patients=allow_different_patients)
        except InputError as error:
            return f"**Cannot read a file.** {_shown(error)}", *blank
        except AskError as error:
            return f"**{BOX_LABELS.get(error.field, error.field)}:** {_shown(error)}", *blank
        if show_change:
            answer, change = ask_showing_change(predictor, pair)
        else:
            answer, change = predictor.ask(pair), None
        interval = (f"{answer.interval['days']:g} days ({answer.interval['source']})" if answer.interval is not None
                    else "none (no prior study shown to the model)")
        cautions = "\n".join(f"- {html.escape(warning)}" for warning in answer.warnings)  # they name the files
        # An empty box would look like no answer yet, or a page that failed.
        status = "" if answer.prediction else "**The model's answer is empty:** it generated no text."
        shown_change = gr.Image(change, visible=change is not None)
        return status, answer.prediction, interval, cautions, answer.prompt, shown_change

    with gr.Blocks(title="lumen: ask about two chest X-rays", analytics_enabled=False,
                   delete_cache=DELETE_CACHE) as app:
        gr.Markdown("# Ask about two chest X-rays\nUpload the current study and, to ask what changed, a prior one "
                    "(DICOM, JPEG or PNG). DICOM dates are read from the files; give them for images.")
        with gr.Row(equal_height=True):
            studies = {}
            for role in ("current", "prior"):
                with gr.Column():
                    file = gr.File(label=f"{role.capitalize()} study", height=110, elem_id=f"{role}-file")
                    image = gr.Image(label=f"{role.capitalize()} study", type="pil", interactive=False, height=360,
                                     buttons=IMAGE_BUTTONS, elem_id=f"{role}-image")
                    date = gr.Markdown(elem_id=f"{role}-date")
                    given_date = gr.Textbox(label=BOX_LABELS[f"{role}_date"], placeholder="YYYY-MM-DD, to give or "
                                            "override the file's date", elem_id=f"{role}-date-box")
                    problem = gr.Markdown()
                    file.change(show_study, file, [image, date, problem], preprocess=False)
                    studies[role] = (file, given_date)
        with gr.Row():
            interval_days = gr.Textbox(label=BOX_LABELS["interval_days"], placeholder="instead of the dates",
                                       elem_id="interval-days")
            preset = gr.Dropdown([*PRESETS, FREE_QUESTION], value="difference", label="Question",
                                 elem_id="preset")
            question = gr.Textbox(label="Your question", visible=False, elem_id="question")
            finding = gr.Textbox(label=BOX_LABELS["finding"], placeholder="e.g. pleural effusion", visible=False,
                                 elem_id="finding")
            days = gr.Textbox(label=BOX_LABELS["days"], placeholder=f"whole days, 1 to {MAX_DAYS}", visible=False,
                              elem_id="days")
            options = gr.Textbox(label=BOX_LABELS["options"], placeholder="for a choice question: worse|better|same",
                                 visible=False, elem_id="options")
        preset.change(question_boxes, preset, [question, finding, days, options])
        show_change = gr.Checkbox(label="show where the model sees change", elem_id="show-change")
        ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="answer")
                interval = gr.Textbox(label="Interval used", interactive=False, elem_id="interval")
                cautions = gr.Markdown(elem_id="warnings")
            change = gr.Image(label="Where the model sees change (current study as the model saw it)",
                              interactive=False, visible=False, height=360, buttons=IMAGE_BUTTONS, elem_id="change")
        with gr.Accordion("Prompt settings from the checkpoint, and the prompt", open=False, elem_id="prompt-details"):
            gr.Markdown(f"Prompt settings, from the checkpoint ({predictor.ckpt.name}):\n\n"
                        f"{settings_text(predictor.settings)}")
            prompt = gr.Textbox(label="Prompt (each image's visual tokens shown as one <image>)", lines=4,
                                interactive=False, elem_id="prompt")
        gr.Markdown(footer(host), elem_id="footer")
        ask_button.click(ask, [studies["current"][0], studies["prior"][0], studies["current"][1], studies["prior"][1],
                               interval_days, preset, question, finding, days, options, show_change],
                         [status, answer, interval, cautions, prompt, change], preprocess=False,
                         concurrency_limit=1)  # one question at a time: every visitor asks the same model
    return app


def demo(cfg: DictConfig) -> None:
    require_checkpoint(cfg, "start the demo with python demo.py")
    predictor = Predictor(cfg.ckpt, cfg.accelerator, cfg.max_new_tokens, cfg.experts.weights_dir)
    with local_gradio():
        serve(build_app(predictor, cfg.host, cfg.allow_different_patients), cfg.host, cfg.port)


def serve(app: gr.Blocks, host: str, port: int, **launch) -> None:
    """The page served on ``host`` only: no share link through Gradio's servers, and no run history (which
    Gradio keeps in the browser and offers to copy to a Hugging Face bucket)."""
    app.launch(server_name=host, server_port=port, share=False, run_history=False, **launch)
