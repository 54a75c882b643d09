"""Executes the notebooks on CPU (nbclient), with their `parameters` cell shortened, and checks what they made."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import FAST_COMPILE, ROOT


def _run(name: str, parameters: str, tmp_path):
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    tagged[0].source = parameters
    # The kernel sees one CPU device, like a user's; it inherits the rest of the test environment.
    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = FAST_COMPILE
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        if saved is not None:
            os.environ["XLA_FLAGS"] = saved
    return nb


def test_quickstart_runs(tmp_path):
    workdir = tmp_path / "runs"
    parameters = f'WORKDIR = "{workdir}"\nLM_STEPS = 4\nMQAR_STEPS = 4\nEVAL_BATCHES = 1\nNEW_TOKENS = 8\n'
    os.symlink(os.path.join(ROOT, "main.py"), tmp_path / "main.py")  # the notebook finds the checkout from here
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    nb = _run("quickstart.ipynb", parameters, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the MQAR accuracy curve
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "bits_per_byte" in text and "def read_config(path):" in text and "MQAR (L=64, D=4) answer accuracy" in text
    with open(workdir / "mqar" / "eval.json") as f:
        report = json.load(f)
    assert report["step"] == 4 and 0.0 <= report["tasks"]["mqar"]["answer_accuracy"] <= 1.0
    assert (workdir / "lm" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb")))
def test_notebooks_are_saved_without_outputs(name):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
