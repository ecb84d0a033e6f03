"""The thin QSettings wrapper: typed defaults, round trips, and the redirected settings file."""

from __future__ import annotations

from app.budget_slider import parse_budget
from app.markdown_view import with_copy_links
from app.settings import DEFAULTS, Key, Settings


def test_defaults_are_sensible(app_data_dir):
    s = Settings()
    sampling = s.sampling()
    assert sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_new_tokens": 512,
                        "repetition_penalty": 1.1, "seed": None}
    assert s.value(Key.EXTRA_MODEL_DIRS) == []
    assert s.value(Key.MODEL_SOURCE) == DEFAULTS[Key.MODEL_SOURCE]


def test_values_round_trip_through_the_file_in_the_data_dir(app_data_dir):
    s = Settings()
    s.set_sampling({"temperature": 0.2, "top_k": 5, "max_new_tokens": 64, "seed": 7})
    s.set_value(Key.EXTRA_MODEL_DIRS, ["/models/a", "/models/b"])
    s.set_value(Key.BUDGET_SHARE, 0.375)
    s.sync()
    assert (app_data_dir / "settings.ini").is_file()
    again = Settings()
    assert again.value(Key.TEMPERATURE) == 0.2 and isinstance(again.value(Key.TOP_K), int)
    assert again.value(Key.MAX_TOKENS) == 64 and again.sampling()["seed"] == 7
    assert again.value(Key.EXTRA_MODEL_DIRS) == ["/models/a", "/models/b"]
    assert again.value(Key.BUDGET_SHARE) == 0.375


def test_budget_parsing():
    assert parse_budget("512MiB", 0) == 512 * 2**20
    assert parse_budget("2 GiB", 0) == 2 * 2**30
    assert parse_budget("1.5GB", 0) == 1_500_000_000
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("64", 0) == 64 * 2**20
    for bad in ("lots", "12 parsecs", ""):
        try:
            parse_budget(bad, 0)
        except ValueError as e:
            assert "512MiB" in str(e)
        else:
            raise AssertionError(bad)


def test_code_blocks_get_copy_links():
    md, blocks = with_copy_links("Here:\n```python\nprint(1)\nprint(2)\n```\nand\n~~~\nraw\n~~~\n```\nopen")
    assert blocks == ["print(1)\nprint(2)", "raw", "open"]
    assert "[Copy code](copy:0)" in md and "[Copy code](copy:2)" in md
    assert md.index("[Copy code](copy:0)") < md.index("```python")


def test_code_with_a_language_is_highlighted(qtbot):
    from PySide6.QtGui import QTextCursor

    from app.markdown_view import MarkdownView

    view = MarkdownView()
    qtbot.addWidget(view)

    def colour_at(word: str) -> str:
        doc = view.document()
        cursor = QTextCursor(doc.find(word))
        return cursor.charFormat().foreground().color().name()

    view.set_content("```python\ndef area(r):\n    return 3 * r\n```\n\n```\ndef plain(r):\n```")
    plain = colour_at("plain")
    assert colour_at("def") != plain and colour_at("return") != plain  # keywords coloured
    assert colour_at("area") != colour_at("def")  # a name is not a keyword
    view.set_content("```nosuchlanguage\ndef x\n```")  # unknown languages stay plain, no error
    assert view.code_blocks == ["def x"]


def test_spin_and_combo_arrows_point_at_files_that_exist():
    import re
    from pathlib import Path

    from app import theme

    for name in ("light", "dark"):
        urls = re.findall(r"url\(([^)]+)\)", theme.style_sheet(name))
        assert len(urls) >= 3 and all(Path(u).is_file() for u in urls) and "$" not in "".join(urls)


def test_empty_charts_show_their_frame_without_si_scaling(qtbot):
    from app.panels import PanelStack

    panels = PanelStack()
    qtbot.addWidget(panels)
    heat = panels.hit_rate.heat_plot
    assert heat.getAxis("left").autoSIPrefix is False and heat.getAxis("bottom").autoSIPrefix is False
    assert heat.viewRange()[1] == [-0.5, 3.5]
    assert panels.throughput.tps_plot.viewRange()[1] == [0, 10]
    assert panels.memory.dev_plot.getAxis("left").labelText == "GiB"
