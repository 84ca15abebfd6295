"""`aigc-ext info`: the machine and backend description."""

from __future__ import annotations

import json

import torch

from aigc_ext import cli


def test_info_json_describes_machine_and_backends(capsys):
    assert cli.main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["torch"] == torch.__version__
    assert doc["cpu"]["threads"] == torch.get_num_threads()
    assert doc["cuda"]["available"] == torch.cuda.is_available()
    assert doc["cpu_kernel"].startswith("isa=")
    by_name = {b["name"]: b for b in doc["backends"]}
    assert by_name["cpu"]["available"] is True and by_name["cpu"]["reason"] is None
    assert by_name["reference"]["available"] is True
    for b in doc["backends"]:
        # an unavailable backend always says why
        assert b["available"] or b["reason"]


def test_info_text_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu kernel: isa=" in out
    import aigc_ext

    for b in aigc_ext.backends():
        assert b.name in out
