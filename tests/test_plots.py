"""The evaluation plots: every mean labelled with its n, zero told apart from n/a, no legend over the
data, and a histogram panel (own count axis) per task and metric."""

from evaluation.plots import distribution_figure, plot_by_question_type, plot_distributions, score_figure
from evaluation.report import aggregate


def scored(task, question_type, **metrics):
    return {"sample_id": "s", "task": task, "question_type": question_type, "question": "q?", "prediction": "p",
            "reference": "r", **metrics}


RECORDS = [
    scored("diagnostic", "presence", closed_accuracy=0, bleu4=0.5),
    scored("diagnostic", "presence", closed_accuracy=0, bleu4=0.25),
    scored("diagnostic", "location", token_recall=1.0, bleu4=1.0),
]


def panel_texts(figure, title):
    (axes,) = [axes for axes in figure.axes if axes.get_title() == title]
    return [text.get_text() for text in axes.texts], axes


def test_a_zero_mean_is_drawn_and_labelled_with_its_value_and_n():
    texts, axes = panel_texts(score_figure(aggregate(RECORDS), "diagnostic"), "presence (n=2)")
    assert texts[0] == "0.000 (n=2)"  # closed_accuracy, the first row
    assert [line.get_xydata().tolist() for line in axes.lines][0] == [[0.0, 0.0]]  # its end tick at 0


def test_a_metric_that_does_not_apply_is_labelled_na_and_has_no_bar():
    texts, axes = panel_texts(score_figure(aggregate(RECORDS), "diagnostic"), "location (n=1)")
    assert texts == ["n/a", "1.000 (n=1)", "1.000 (n=1)"]  # closed_accuracy, token_recall, bleu4
    assert [bar.get_y() + bar.get_height() / 2 for bar in axes.patches] == [1.0, 2.0]  # no bar in row 0


def test_the_score_figure_has_no_legend():
    figure = score_figure(aggregate(RECORDS), "diagnostic")
    assert all(axes.get_legend() is None for axes in figure.axes)


def test_each_task_gets_its_own_histogram_panel_and_count_axis():
    records = [scored("diagnostic", "presence", bleu4=0.5)] * 50 + [scored("difference", "difference", bleu4=0.1)] * 2
    large, small = distribution_figure(records).axes
    assert (large.get_title(), small.get_title()) == ("diagnostic: bleu4 (n=50)", "difference: bleu4 (n=2)")
    assert large.get_ylim()[1] > 50 and small.get_ylim()[1] < 3


def test_a_metric_a_task_lacks_gets_an_na_histogram_panel():
    panels = distribution_figure([scored("diagnostic", "location", token_recall=1.0),
                                  scored("difference", "difference", bleu4=0.1)]).axes
    # Columns token_recall, bleu4; rows diagnostic, difference.
    assert [[text.get_text() for text in axes.texts] for axes in panels] == [[], ["n/a"], ["n/a"], []]


def test_the_plots_are_written_as_png_files(tmp_path):
    paths = [*plot_by_question_type(aggregate(RECORDS), tmp_path), plot_distributions(RECORDS, tmp_path)]
    assert [path.name for path in paths] == ["scores_diagnostic.png", "score_distributions.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in paths)
