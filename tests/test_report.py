import json

from jaxleak import report
from jaxleak.scores import LayerScores, Score


def _results(name):
    scores = LayerScores("sensitivity", {"Conv_0": Score(2.0, (1.5, 2.5), {"raw": 3.0}),
                                         "Dense_0": Score(1.0, None, {})},
                         unit="dimensionless", meta={"surrogate": "GradDefense surrogate, not the measure"})
    return {
        "schema": "jaxleak.results/1",
        "config": {"dataset": name},
        "dataset": {"name": name, "n": 3, "latent": [name], "latent_descriptions": {name: "desc <i>"}},
        "model": {"name": "lenet", "num_params": 10, "layers": [{"name": "Conv_0", "params": 5}]},
        "measures": {"sensitivity": scores.to_dict()},
        "top_layers": {"sensitivity": "Conv_0"},
        "environment": {}, "timing": {},
    }


def test_report_escapes_user_strings_and_embeds_figures(tmp_path):
    evil = "<script>alert(1)</script>"
    (tmp_path / "results.json").write_text(json.dumps(_results(evil)))
    # a 1x1 PNG
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d"
                        "49444154789c6360000002000154a24f5d0000000049454e44ae426082")
    (tmp_path / "sensitivity.png").write_bytes(png)
    path = report.write_report(str(tmp_path))
    text = open(path).read()
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "desc &lt;i&gt;" in text
    assert "data:image/png;base64," in text
    assert "GradDefense surrogate, not the measure" in text
    assert '<table class="meta"><tr><td>surrogate</td>' in text  # meta as a table of fields
    assert "Conv_0" in text and "[1.5, 2.5]" in text
    assert "http://" not in text and "https://" not in text, "the page must not load anything from the network"
