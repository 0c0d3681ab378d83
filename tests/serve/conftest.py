"""Session fixtures: one tiny default xbit checkpoint (embedding table and tied head quantized too, as
`python -m xbit.quantize` writes by default) and one real server subprocess shared by the serve tests."""

import pytest

from tests.serve.helpers import ServerProcess, make_xbit_dir

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def xbit_dir(tmp_path_factory):
    return make_xbit_dir(tmp_path_factory.mktemp("serve") / "tiny-xbit")


@pytest.fixture(scope="session")
def server(xbit_dir):
    srv = ServerProcess(xbit_dir, "--max-batch", "4", "--max-seq-len", "256")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def ref_model(xbit_dir):
    """The same checkpoint loaded in-process, for model.generate comparisons."""
    import torch
    import xbit
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    return xbit.load(xbit_dir, device="cpu"), AutoTokenizer.from_pretrained(xbit_dir)


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
